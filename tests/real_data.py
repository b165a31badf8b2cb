"""Real scans for tests: the ``totalsegmentator`` source distribution's ``tests/reference_files/`` (a small abdominal
CT with TotalSegmentator labels, an MR crop with labels, a 20-slice DICOM CT series).

Fetched once with ``pip download`` from the package index and cached under ``$NNUNET_SAM_TEST_DATA`` (default
``~/.cache/nnunet_sam/test_data``); never committed. :func:`reference_files` skips the calling test when the
download is impossible (no index reachable), naming why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

TOTALSEGMENTATOR_VERSION = "2.18.0"
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
    root = cache_dir() / f"totalsegmentator-{TOTALSEGMENTATOR_VERSION}"
    target = root / "reference_files"
    if (target / "example_ct_sm.nii.gz").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp]
        cmd.append(f"totalsegmentator=={TOTALSEGMENTATOR_VERSION}")
        result = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
        archives = list(Path(tmp).glob("totalsegmentator-*.tar.gz"))
        if result.returncode != 0 or not archives:
            pytest.skip(
                f"could not pip download the totalsegmentator {TOTALSEGMENTATOR_VERSION} sdist: {result.stderr[-300:]}"
            )
        with tarfile.open(archives[0]) as tar:
            members = [
                m for m in tar.getmembers() if "/tests/reference_files/" in m.name and "aorta_report" not in m.name
            ]
            tar.extractall(tmp, members=members, filter="data")
        extracted = next(Path(tmp).glob("totalsegmentator-*/tests/reference_files"))
        if not target.exists():
            os.replace(extracted, target)  # atomic: a concurrent run either sees all of it or nothing
    return target
