"""Trainer initialisation: patch rule, plans overrides and the errors raised before anything is written."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sam_testing import dataset_json, minimal_plans

from nnunet_sam.backbones.checkpoints import CheckpointError
from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.trainers.base import UnsupportedDatasetError
from nnunet_sam.trainers.masksam import MaskSAMTrainer, MaskSAMTrainer_tiny
from nnunet_sam.training.planning import PatchError, PatchRule, derive_patch, sam_settings

CPU = torch.device("cpu")


@pytest.fixture
def results(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    return tmp_path / "nnUNet_results"


@pytest.mark.parametrize(
    ("backbone", "planned", "rule", "expected"),
    [
        ("vit_b", [64, 160, 160], PatchRule(8, 1), [8, 224, 224]),  # one 14x14-token window in-plane
        ("vit_b", [4, 320, 256], PatchRule(8, 2), [4, 448, 448]),  # keeps a shallow plan's depth
        ("vit_b", [512, 512], PatchRule(8, 1), [224, 224]),  # 2d configurations: depth 1
        ("tiny", [24, 96, 96], PatchRule(4, 2), [4, 64, 64]),
        ("tiny", [24, 20, 20], PatchRule(4, 2), [4, 32, 32]),
    ],
)
def test_patch_rule(backbone, planned, rule, expected):
    assert derive_patch(planned, get_backbone(backbone), rule) == expected


def test_user_block_in_plans_overrides_rule():
    config = {"patch_size": [24, 96, 96], "nnunet_sam": {"patch_size": [2, 32, 32], "num_queries": 12}}
    record = sam_settings(config, get_backbone("tiny"), PatchRule(4, 2), num_classes=4)
    assert record == {
        "backbone": "tiny",
        "patch_size": [2, 32, 32],
        "sam_input_size": 32,
        "num_queries": 12,
        "attention": "sdpa",
    }


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"patch_size": [4, 60, 60]}, "does not fit the tiny backbone: it must be a multiple of its 8 px"),
        ({"patch_size": [4, 64, 32]}, "needs a square in-plane patch"),
        ({"patch_size": [64, 64], "sam_input_size": 12}, "SAM input size 12 does not fit"),
        ({"num_queries": 3}, "has 4 classes .* only 3 queries"),
    ],
)
def test_settings_that_cannot_work_are_refused(block, message):
    config = {"patch_size": [24, 96, 96], "nnunet_sam": block}
    with pytest.raises(PatchError, match=message):
        sam_settings(config, get_backbone("tiny"), PatchRule(4, 2), num_classes=4)


def test_more_classes_than_queries_fails_at_init(results):
    class FewQueries(MaskSAMTrainer_tiny):
        num_queries = 4

    with pytest.raises(PatchError, match="6 classes .* only 4 queries.*num_queries >= 6"):
        FewQueries(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(5), CPU)
    assert not results.exists(), "nothing may be written before the error"


def test_region_and_ignore_label_datasets_are_refused(results):
    regions = dataset_json(2, tumour_region=[1, 2])
    regions["regions_class_order"] = [1, 2, 3]
    with pytest.raises(UnsupportedDatasetError, match="region-based training"):
        MaskSAMTrainer_tiny(minimal_plans([24, 96, 96]), "3d_fullres", 0, regions, CPU)
    with pytest.raises(UnsupportedDatasetError, match="ignore label"):
        MaskSAMTrainer_tiny(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(2, ignore=3), CPU)
    assert not results.exists()


def test_real_backbones_refuse_to_start_without_checkpoint(results, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="nnUNet_SAM_checkpoints is not set"):
        MaskSAMTrainer(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(2), CPU)
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth"):
        MaskSAMTrainer(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(2), CPU)
    assert not results.exists()


def test_tiny_trainer_records_its_patch_in_the_plans(results):
    plans = minimal_plans([24, 96, 96])
    trainer = MaskSAMTrainer_tiny(plans, "3d_fullres", 0, dataset_json(3), CPU)
    saved = trainer.plans_manager.plans["configurations"]["3d_fullres"]
    assert saved["patch_size"] == [4, 64, 64]
    assert saved["nnunet_sam"] == {
        "format": 2,
        "backbone": "tiny",
        "patch_size": [4, 64, 64],
        "sam_input_size": 64,
        "num_queries": 8,
        "options": dataclasses.asdict(MaskSAMTrainer_tiny.options),
        "attention": "sdpa",
    }
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [24, 96, 96], "caller's plans untouched"
    assert trainer.enable_deep_supervision is False
