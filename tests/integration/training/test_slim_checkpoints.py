"""Slim checkpoints (nnunet_sam.training.slim_checkpoints): trained weights + the base file's SHA-256, loaded
everywhere.

A tiny MaskSAM trainer with a frozen base checkpoint takes one training step, then saves a default and a slim
checkpoint. The slim one must be smaller, hold no frozen SAM weight, and give back exactly the trained network
through every loading path: ``network.load_state_dict`` (what nnUNetPredictor does), nnU-Net's
``load_checkpoint`` (``--c``) and a full ``nnUNetPredictor`` model folder prediction.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from sam_testing import dataset_json, minimal_plans, write_tiny_checkpoint

from nnunet_sam.backbones.checkpoints import CheckpointError, resize_to_input
from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
from nnunet_sam.training.slim_checkpoints import BASE_KEY, SLIM_ENV, BaseCheckpointMismatchError, file_sha256

CPU = torch.device("cpu")
PATCH = [4, 32, 32]


class _Slim(MaskSAMTrainer_tiny):
    slim_checkpoints = True


def _trainer(slim: bool, root: Path, monkeypatch, seed: int = 0):
    """A MaskSAMTrainer_tiny (found by nnU-Net's lookup), slim through the environment variable."""
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(root / var))
    monkeypatch.setenv(SLIM_ENV, "1" if slim else "0")
    torch.manual_seed(seed)
    trainer = MaskSAMTrainer_tiny(minimal_plans(PATCH), "3d_fullres", 0, dataset_json(2), CPU)
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
    # SAMTrainer.initialize's weight loading, without the parts of nnU-Net's that need preprocessed data
    state = resize_to_input(trainer._sam_state, get_backbone("tiny"), trainer.sam_record["sam_input_size"])
    trainer.network.sam.load_state_dict(state, strict=True)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.was_initialized = True
    return trainer


def _train_one_step(trainer) -> None:
    target = torch.zeros(2, 1, *PATCH)
    target[..., 4:14, 6:20] = 1
    target[..., 18:28, 10:30] = 2
    trainer.train_step({"data": torch.randn(2, 1, *PATCH), "target": target})


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """(trainer after one step, full checkpoint path, slim checkpoint path, base checkpoint path)."""
    base = write_tiny_checkpoint(tmp_path)
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    full_trainer = _trainer(False, tmp_path, monkeypatch)
    trainer = _trainer(True, tmp_path, monkeypatch)
    _train_one_step(trainer)
    full_trainer.network.load_state_dict(trainer.network.state_dict())  # the same weights, saved in full
    os.makedirs(trainer.output_folder, exist_ok=True)
    slim, full = Path(trainer.output_folder) / "slim.pth", Path(trainer.output_folder) / "full.pth"
    trainer.save_checkpoint(str(slim))
    full_trainer.save_checkpoint(str(full))
    return trainer, full, slim, base


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _tensors(path: Path) -> list[torch.Tensor]:
    return [t for t in _load(path)["network_weights"].values() if isinstance(t, torch.Tensor)]


def test_slim_checkpoint_holds_only_what_the_base_file_lacks(trained):
    trainer, full, slim, base = trained
    weights = _load(slim)["network_weights"]
    assert weights[BASE_KEY] == {
        "file": "sam_tiny.pth",
        "sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
        "backbone": "tiny",
        "input_size": trainer.sam_record["sam_input_size"],
    }
    frozen = {f"sam.{n}" for n, p in trainer.network.sam.named_parameters() if not p.requires_grad}
    frozen |= {f"sam.{n}" for n, _ in trainer.network.sam.named_buffers()}  # e.g. positional frequencies
    trained_names = {n for n, p in trainer.network.named_parameters() if p.requires_grad}
    assert frozen and not frozen & weights.keys(), "a frozen SAM weight was stored"
    assert trained_names <= weights.keys(), "a trained weight is missing"
    sizes = {p.name: sum(t.numel() * t.element_size() for t in _tensors(p)) for p in (full, slim)}
    trainable = {n for n, p in trainer.network.sam.named_parameters() if p.requires_grad}
    frozen_bytes = sum(t.numel() * 4 for n, t in trainer.network.sam.state_dict().items() if n not in trainable)
    assert sizes["slim.pth"] == sizes["full.pth"] - frozen_bytes, sizes
    assert BASE_KEY not in _load(full)["network_weights"], "the default must stay self-contained"


def test_slim_weights_load_into_a_fresh_network_exactly(trained):
    trainer, full, slim, base = trained
    torch.manual_seed(123)  # different random initialisation
    fresh = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
    fresh.load_state_dict(_load(slim)["network_weights"])  # strict, as nnUNetPredictor calls it
    expected = trainer.network.state_dict()
    loaded = fresh.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_continue_training_from_a_slim_checkpoint(trained, tmp_path, monkeypatch):
    trainer, full, slim, base = trained
    resumed = _trainer(True, tmp_path, monkeypatch, seed=5)
    resumed.load_checkpoint(str(slim))  # nnU-Net's --c path
    expected = trainer.network.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in resumed.network.state_dict().items())
    _train_one_step(resumed)  # and training goes on


def test_nnunet_predictor_gives_identical_logits_from_slim_and_full(trained, tmp_path):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    trainer, full, slim, base = trained
    save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(trainer.dataset_json, os.path.join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    data = torch.randn(1, 6, 40, 40)
    logits = {}
    for path in (full, slim):
        predictor = nnUNetPredictor(
            use_mirroring=False, device=CPU, allow_tqdm=False, perform_everything_on_device=False
        )
        predictor.initialize_from_trained_model_folder(trainer.output_folder_base, (0,), path.name)
        logits[path.name] = predictor.predict_logits_from_preprocessed_data(data)
    assert torch.equal(logits["full.pth"], logits["slim.pth"])


def test_a_different_base_file_is_refused_with_both_hashes(trained, tmp_path):
    trainer, full, slim, base = trained
    wanted = file_sha256(base)
    write_tiny_checkpoint(tmp_path, seed=1)  # same name, other weights
    found = file_sha256(base)
    fresh = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
    with pytest.raises(BaseCheckpointMismatchError, match=f"(?s){wanted}.*{found}"):
        fresh.load_state_dict(_load(slim)["network_weights"])


def test_a_missing_base_file_is_named(trained, monkeypatch):
    trainer, full, slim, base = trained
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(base.parent / "elsewhere"))
    fresh = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
    with pytest.raises(CheckpointError, match="sam_tiny.pth .SHA-256 [0-9a-f]{64}.*nnUNet_SAM_checkpoints"):
        fresh.load_state_dict(_load(slim)["network_weights"])
    fresh.load_state_dict(_load(full)["network_weights"])  # a self-contained checkpoint needs no base file


def test_slim_without_a_base_file_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    with pytest.raises(CheckpointError, match="random and trained"):
        _Slim(minimal_plans(PATCH), "3d_fullres", 0, dataset_json(2), CPU)
    assert not (tmp_path / "results").exists()


def test_environment_variable_turns_slim_checkpoints_on(tmp_path, monkeypatch):
    write_tiny_checkpoint(tmp_path)
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.delenv(SLIM_ENV, raising=False)
    assert MaskSAMTrainer_tiny(minimal_plans(PATCH), "3d_fullres", 0, dataset_json(2), CPU)._slim_record is None
    monkeypatch.setenv(SLIM_ENV, "1")
    trainer = MaskSAMTrainer_tiny(minimal_plans(PATCH), "3d_fullres", 0, dataset_json(2), CPU)
    assert trainer._slim_record["sha256"] == file_sha256(tmp_path / "sam_tiny.pth")
