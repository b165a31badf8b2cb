"""Real scans for tests: the ``totalsegmentator`` source distribution's ``tests/reference_files/`` (a small abdominal
CT with TotalSegmentator labels, an MR crop with labels, a 20-slice DICOM CT series).

Fetched once with ``pip download`` from the package index (:func:`nnunet_sam.benchmarking.real_images.
fetch_reference_files`) and cached under ``$NNUNET_SAM_TEST_DATA`` (default ``~/.cache/nnunet_sam/test_data``); never
committed. :func:`reference_files` skips the calling test when the download is impossible, naming why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nnunet_sam.benchmarking.real_images import fetch_reference_files

CACHE_ENV = "NNUNET_SAM_TEST_DATA"

# TotalSegmentator v2 "total" task: label id of each structure the real-image tests use
TOTALSEG_LABELS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "gallbladder": 4,
    "liver": 5,
    "stomach": 6,
    "pancreas": 7,
    "adrenal_gland_right": 8,
    "adrenal_gland_left": 9,
    "aorta": 52,
    "inferior_vena_cava": 63,
}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nnunet_sam" / "test_data")


def reference_files() -> Path:
    """The cached ``reference_files`` folder of the totalsegmentator sdist (downloaded on first use)."""
    try:
        return fetch_reference_files(cache_dir())
    except RuntimeError as error:
        pytest.skip(str(error))
