"""Resolution is a setting of every method: SAM sees the patch at ``input_scale`` times its size.

Every method builds at 2x and 4x, loads a checkpoint in the official layout strictly (resized to the input size as
the trainer does) and runs forward and backward: the tiny backbone on the CPU, ViT-B on the meta device.
"""

from __future__ import annotations

import json

import pytest
import torch
from sam_testing import dataset_json, minimal_plans

from nnunet_sam.backbones.checkpoints import resize_to_input
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone, reference_shapes
from nnunet_sam.benchmarking.configs import on_meta, stand_in_trainer, training_forwards
from nnunet_sam.benchmarking.counting import allow_meta_masks, surrogate_loss
from nnunet_sam.model_record import ModelRecord
from nnunet_sam.prompting.radsam_prompts import SimulatedInteraction
from nnunet_sam.trainers import masksam, pansam, radsam, sam3d_adapter, self_prompt_sam
from nnunet_sam.training.planning import PatchError, sam_settings

CPU = torch.device("cpu")
TINY = [
    masksam.MaskSAMTrainer_tiny,
    self_prompt_sam.SelfPromptSAMTrainer_tiny,
    sam3d_adapter.SAM3DAdapterTrainer_prompted_tiny,
    pansam.PanSAMTrainer_tiny,
    radsam.RadSAMTrainer_tiny,
]
VIT_B = [
    masksam.MaskSAMTrainer,
    self_prompt_sam.SelfPromptSAMTrainer,
    sam3d_adapter.SAM3DAdapterTrainer,
    pansam.PanSAMTrainer,
    radsam.RadSAMTrainer,
]


def _scaled(trainer_class: type, scale: int, patch: list[int]) -> type:
    return type(trainer_class.__name__, (trainer_class,), {"input_scale": scale, "fixed_patch": tuple(patch)})


def _classes(trainer_class: type) -> int:
    return 2 if issubclass(trainer_class, pansam.PanSAMTrainer) else 4


def _block(trainer_class: type, patch: list[int]) -> dict:
    """The saved block (through JSON, as in plans.json) for a configuration whose plan is ``patch``."""
    block = trainer_class.sam_block({"patch_size": patch}, _classes(trainer_class))
    return json.loads(json.dumps(block))


def _loss(net: torch.nn.Module, x: torch.Tensor, is_radsam: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A training forward of the network (RadSAM: a simulated prompt + one correction round); its semantic output
    and a loss that reads every output."""
    if is_radsam:
        reference = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
        reference[:, 4:-4, 6:-6] = True
        out = net(x, interaction=SimulatedInteraction(reference, rounds=1, generator=torch.Generator().manual_seed(0)))
        return out[-1][:, 0], out.float().mean()
    out = net(x, return_all=True)
    tensors = [v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return out["semantic"], sum(t.float().clamp(-50, 50).mean() for t in tensors)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("trainer_class", TINY, ids=lambda c: c.__name__)
def test_tiny_methods_train_at_2x_and_4x(trainer_class, scale):
    is_2d = trainer_class is radsam.RadSAMTrainer_tiny
    patch = [32, 32] if is_2d else [2, 32, 32]
    cls = _scaled(trainer_class, scale, patch)
    block = _block(cls, patch)
    assert block["patch_size"] == patch and block["sam_input_size"] == 32 * scale
    spec = get_backbone("tiny")
    torch.manual_seed(0)
    net = cls.build_network(block, 1, _classes(cls))
    official = build_sam(spec).state_dict()  # the official layout at the checkpoint's own size
    net.sam.load_state_dict(resize_to_input(official, spec, block["sam_input_size"]), strict=True)
    grid = block["sam_input_size"] // spec.patch_size
    assert net.sam.image_encoder.pos_embed.shape[1:3] == (grid, grid)
    if isinstance(net, sam3d_adapter.SAM3DAdapterNetwork):
        assert net.encoder.grid == (patch[0] // cls.slice_group, grid, grid)
    else:
        stem = net.stem  # RadSAM's input-contract stem resizes to the SAM input size itself
        assert stem.input_size == 32 * scale
    if isinstance(net, masksam.MaskSAMNetwork):  # the learned x2^k stem of the paper
        assert net.stem.learned_upsampling and len(net.stem.upsample) == 2 * round(scale).bit_length() - 2
    net.train()
    net.requires_grad_(True)
    x = torch.randn(1, 1, *patch)
    semantic, loss = _loss(net, x, is_2d)
    assert semantic.shape[-2:] == tuple(patch[-2:]) and torch.isfinite(semantic).all()
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("trainer_class", VIT_B, ids=lambda c: c.__name__)
def test_vit_b_methods_at_2x_and_4x_on_meta(trainer_class, scale):
    """ViT-B: the official checkpoint's keys and shapes, resized to the input, load strictly, and every method runs
    forward and backward on meta tensors. PanSAM and RadSAM run their trainer's training forward (forward_batch):
    each of PanSAM's three stages, RadSAM's simulated prompt with its correction rounds, with the parameters their
    configure_optimizers trains (CLAHE and the prompt generators are shape-only on meta tensors)."""
    is_2d = trainer_class is radsam.RadSAMTrainer
    patch = [128, 128] if is_2d else [4, 128, 128]
    cls = _scaled(trainer_class, scale, patch)
    block = _block(cls, patch)
    assert block["sam_input_size"] == 128 * scale
    spec = get_backbone("vit_b")
    net = on_meta(lambda: cls.build_network(block, 1, _classes(cls)))
    official = {k: torch.empty(shape, device="meta") for k, shape in reference_shapes(spec).items()}
    net.sam.load_state_dict(resize_to_input(official, spec, block["sam_input_size"]), strict=True)
    assert net.sam.image_encoder.pos_embed.shape[1:3] == (8 * scale, 8 * scale)
    net.train()
    x = torch.zeros(2, 1, *patch, device="meta")
    if trainer_class in (pansam.PanSAMTrainer, radsam.RadSAMTrainer):
        stand_in_trainer(cls, net, _classes(cls)).configure_optimizers()
        for phase, forward in training_forwards(cls, _classes(cls)).items():
            net.zero_grad(set_to_none=True)
            with allow_meta_masks():
                out = forward(net, x)
                surrogate_loss(out).backward()
            if is_2d:  # initial prompt + correction rounds, one structure per slice, SAM's four masks
                assert out.shape == (1 + cls.correction_rounds, 2, 1, 4, *patch), phase
            else:
                assert out["semantic"].shape == (2, _classes(cls), *patch), phase
            trained = [p for p in net.parameters() if p.grad is not None]
            assert trained and all(p.requires_grad for p in trained), phase
        if is_2d:
            assert net.sam.image_encoder.patch_embed.proj.weight.grad is not None, "RadSAM fine-tunes SAM"
        return
    with allow_meta_masks():
        semantic, loss = _loss(net, x, False)
        assert semantic.shape == (2, _classes(cls), *patch)
        loss.backward()
    assert any(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_3dsam_adapter_trainer_with_a_set_input_size_builds_and_loads(tmp_path, monkeypatch):
    """The crash of issue 14: a 3DSAM-adapter trainer with ``sam_input_size`` set failed to load SAM's weights
    (pos_embed built at the patch size, checkpoint resized to the input size)."""
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)

    class Sized(sam3d_adapter.SAM3DAdapterTrainer_tiny):
        sam_input_size = 128

    trainer = Sized(minimal_plans([16, 64, 64]), "3d_fullres", 0, dataset_json(2), CPU)
    assert trainer.sam_record["patch_size"] == [16, 64, 64] and trainer.sam_record["sam_input_size"] == 128
    net = Sized.build_network(trainer.sam_record, 1, 3)
    state = resize_to_input(build_sam(get_backbone("tiny")).state_dict(), get_backbone("tiny"), 128)
    net.sam.load_state_dict(state, strict=True)
    assert net.eval()(torch.randn(1, 1, 16, 64, 64)).shape == (1, 3, 16, 64, 64)


def test_a_record_of_the_previous_version_builds_the_same_3dsam_adapter_network():
    """Format-1 3DSAM-adapter records hold sam_input_size = the in-plane patch: the network (parameter names and
    shapes, decoder stages) is the one the previous version built from the same record."""
    old = {"backbone": "tiny", "patch_size": [16, 64, 64], "sam_input_size": 64, "num_queries": 8}
    old.update(slice_group=2, window=4)
    trainer = sam3d_adapter.SAM3DAdapterTrainer_tiny
    net = trainer.build_network(ModelRecord.from_block(old, trainer.record_options()), 1, 4)
    assert len(net.decoder.stages) == 3  # log2 of the 8 px ViT patch, as before
    assert net.encoder.grid == (8, 8, 8) and net.stem.input_size == 64


def test_input_scale_goes_into_the_saved_record_for_2d_and_3d(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    for trainer_class, planned, configuration in (
        (masksam.MaskSAMTrainer_tiny, [24, 96, 96], "3d_fullres"),
        (masksam.MaskSAMTrainer_tiny, [96, 96], "2d"),
    ):
        cls = type("Scaled", (trainer_class,), {"input_scale": 2})
        trainer = cls(minimal_plans(planned, configuration), configuration, 0, dataset_json(2), CPU)
        saved = trainer.plans_manager.plans["configurations"][configuration]["nnunet_sam"]
        assert saved["sam_input_size"] == 2 * saved["patch_size"][-1] == 128
        net = trainer_class.build_network(saved, 1, 3)  # the plain class: everything comes from the record
        assert net.input_size == 128


def test_a_scale_that_gives_no_whole_pixel_count_is_refused():
    cls = type("Odd", (masksam.MaskSAMTrainer_tiny,), {"input_scale": 1.3, "fixed_patch": (4, 32, 32)})
    with pytest.raises(PatchError, match="input_scale 1.3 .* not a whole number"):
        cls.sam_block({"patch_size": [4, 32, 32]}, 3)


def test_the_plans_block_scale_wins_over_the_trainer_settings():
    spec, rule = get_backbone("tiny"), masksam.MaskSAMTrainer_tiny.patch_rule()
    config = {"patch_size": [4, 32, 32], "nnunet_sam": {"input_scale": 2}}
    assert sam_settings(config, spec, rule, 3, sam_input_size=256, input_scale=4)["sam_input_size"] == 64
    config = {"patch_size": [4, 32, 32]}
    assert sam_settings(config, spec, rule, 3, sam_input_size=256, input_scale=4)["sam_input_size"] == 256
    assert sam_settings(config, spec, rule, 3, input_scale=4)["sam_input_size"] == 128
    assert sam_settings(config, spec, rule, 3)["sam_input_size"] == 32
