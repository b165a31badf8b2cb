"""Backbone building, checkpoint loading, resizing and the step-0 equality with stock SAM."""

from __future__ import annotations

import argparse

import pytest
import torch
from sam_testing import write_standin_checkpoint, write_tiny_checkpoint
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT

from nnunet_sam.backbones.checkpoints import (
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    resize_to_input,
)
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone, reference_shapes
from nnunet_sam.network_architectures.masksam import MaskSAMNetwork


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """sam_vit_b_01ec64.pth with random weights written by segment-anything's own builder."""
    folder = tmp_path_factory.mktemp("sam_ckpt")
    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    # random (not zero) relative-position tables so resizing them is actually checked
    for name, p in sam.named_parameters():
        if "rel_pos" in name:
            p.data.normal_(0, 0.02)
    torch.save(sam.state_dict(), folder / "sam_vit_b_01ec64.pth")
    return folder


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_layout_matches_official_builder(name):
    with torch.device("meta"):
        official = {k: v.shape for k, v in sam_model_registry[name]().state_dict().items()}
    assert official == reference_shapes(get_backbone(name))


def test_vit_b_loads_strictly_and_equals_stock_encoder_at_init(vit_b_checkpoint, monkeypatch):
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(vit_b_checkpoint))
    spec = get_backbone("vit_b")
    state = load_checkpoint(find_checkpoint(spec), spec)
    size, depth = 112, 2  # 7x7 tokens: windowed blocks pad to 14x14, global blocks use resized tables
    resized = resize_to_input(state, spec, size)
    net = MaskSAMNetwork("vit_b", 1, 3, 8, (depth, size, size), size)
    result = net.sam.load_state_dict(resized, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    stock = build_sam(spec, size).image_encoder
    stock.load_state_dict({k[len("image_encoder.") :]: v for k, v in resized.items() if k.startswith("image_encoder.")})
    assert isinstance(stock, ImageEncoderViT)
    x = torch.randn(depth, 3, size, size)
    with torch.no_grad():
        ours, _ = net.encoder_additions(net.sam.image_encoder, x)
        ref = stock(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)

    # sanity: the comparison is sensitive to the additions once they are no longer zero
    with torch.no_grad():
        net.encoder_additions.attn_adapters[3].up.weight.normal_()
        changed, _ = net.encoder_additions(net.sam.image_encoder, x)
    assert not torch.allclose(changed, ref, atol=1e-3)


def test_resize_interpolates_position_tables():
    spec = get_backbone("vit_b")
    with torch.device("meta"):
        shapes = reference_shapes(spec)
    state = {
        "image_encoder.pos_embed": torch.randn(shapes["image_encoder.pos_embed"]),
        **{f"image_encoder.blocks.{i}.attn.rel_pos_{a}": torch.randn(127, 64) for i in range(12) for a in "hw"},
    }
    out = resize_to_input(state, spec, 224)
    assert out["image_encoder.pos_embed"].shape == (1, 14, 14, 768)
    for i in range(12):
        expected = (27, 64) if i in spec.global_attn_indexes else (127, 64)  # windowed blocks keep 2*14-1
        assert out[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape == expected
    # a constant table stays constant (interpolation, not cropping or zero padding)
    const = {**state, "image_encoder.pos_embed": torch.full((1, 64, 64, 768), 0.5)}
    torch.testing.assert_close(
        resize_to_input(const, spec, 224)["image_encoder.pos_embed"], torch.full((1, 14, 14, 768), 0.5)
    )


def test_missing_env_var_and_file(monkeypatch, tmp_path):
    spec = get_backbone("vit_b")
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    with pytest.raises(CheckpointError, match="nnUNet_SAM_checkpoints is not set"):
        find_checkpoint(spec)
    monkeypatch.setenv("nnUNet_SAM_checkpoints", str(tmp_path))
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth.*was not found"):
        find_checkpoint(spec)
    assert find_checkpoint(get_backbone("tiny"), required=False) is None


def test_wrong_backbone_checkpoint(tmp_path):
    path = write_standin_checkpoint(tmp_path / "sam_vit_b_01ec64.pth", "vit_l")
    with pytest.raises(CheckpointError, match="holds vit_l weights, but the trainer uses the vit_b backbone"):
        load_checkpoint(path, get_backbone("vit_b"))


def test_corrupt_and_truncated_checkpoint(tmp_path):
    good = write_tiny_checkpoint(tmp_path)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match="corrupt, truncated or not a plain PyTorch state dict"):
            load_checkpoint(path, get_backbone("tiny"))


def test_unexpected_and_missing_keys(tmp_path):
    spec = get_backbone("tiny")
    state = build_sam(spec).state_dict()
    extra = dict(state, **{"image_encoder.extra_adapter.weight": torch.zeros(3)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="1 unexpected keys .*extra_adapter"):
        load_checkpoint(tmp_path / "extra.pth", spec)
    missing = {k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_prediction_head")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="missing keys .*iou_prediction_head"):
        load_checkpoint(tmp_path / "missing.pth", spec)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"x": argparse.Namespace(command="rm -rf /")}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="corrupt, truncated or not a plain PyTorch state dict"):
        load_checkpoint(tmp_path / "evil.pth", get_backbone("tiny"))
