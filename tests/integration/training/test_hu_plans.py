"""HU plans (nnunet_sam_make_hu_plans): CT channels kept in HU by nnU-Net's own preprocessing, windowed by RadSAM."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sam_testing import nnunet_env, run_tool

from nnunet_sam.network_architectures.radsam import intensity_windows
from nnunet_sam.training.hu_plans import HUPlansError, hu_plans
from nnunet_sam.training.synthetic_plans import nnunet_preprocessing, plans_for_patch

BIN = Path(sys.executable).parent


def test_hu_plans_keep_ct_channels_in_hu_under_their_own_name():
    plans = plans_for_patch([64, 64], "2d", data_identifier="nnUNetPlans_2d", **nnunet_preprocessing([1.0, 1.0]))
    plans["configurations"]["2d"]["normalization_schemes"] = ["CTNormalization", "ZScoreNormalization"]
    out = hu_plans(plans)
    assert out["plans_name"] == "nnUNetPlans_HU"
    assert out["configurations"]["2d"]["normalization_schemes"] == ["NoNormalization", "ZScoreNormalization"]
    assert out["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_HU_2d"
    assert plans["configurations"]["2d"]["normalization_schemes"][0] == "CTNormalization"  # a copy
    scale, shift = intensity_windows(["NoNormalization"], {}, (-160.0, 240.0))[0]
    assert (scale * -160 + shift, scale * 240 + shift) == (0.0, 1.0)  # the window applies to HU directly
    with pytest.raises(HUPlansError, match="no CT channel"):
        hu_plans(plans_for_patch([64, 64], "2d", **nnunet_preprocessing([1.0, 1.0])))


@pytest.mark.slow
def test_nnunet_preprocesses_hu_plans_to_the_scanners_values(tmp_path):
    env = nnunet_env(tmp_path)
    run_tool([str(BIN / "nnunet_sam_make_phantom"), "--raw", str(tmp_path / "raw"), "--id", "977", "--num-train", "2",
              "--num-test", "0", "--shape", "16", "64", "64"], env)  # fmt: skip
    run_tool([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "977", "-c", "2d", "-np", "1"], env)
    run_tool([str(BIN / "nnunet_sam_make_hu_plans"), "-d", "977"], env)
    run_tool([str(BIN / "nnUNetv2_preprocess"), "-d", "977", "-plans_name", "nnUNetPlans_HU", "-c", "2d", "-np", "1"],
             env)  # fmt: skip
    folder = next((tmp_path / "preprocessed").glob("Dataset977_*"))
    plans = json.loads((folder / "nnUNetPlans_HU.json").read_text())
    assert plans["configurations"]["2d"]["normalization_schemes"] == ["NoNormalization"]
    import blosc2
    import SimpleITK as sitk

    case = sorted((folder / "nnUNetPlans_HU_2d").glob("*.b2nd"))[0]
    data = blosc2.open(str(case))[:]
    raw = next((tmp_path / "raw").glob("Dataset977_*")) / "imagesTr" / case.name.replace(".b2nd", "_0000.nii.gz")
    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(raw))).astype(np.float32)
    np.testing.assert_array_equal(data[0], hu)  # same spacing in-plane: the scanner's values, not clipped z-scores
    assert data.min() < plans["foreground_intensity_properties_per_channel"]["0"]["percentile_00_5"]
