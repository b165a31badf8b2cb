"""Memory-efficient SAM attention equals segment-anything's, in value and gradient; old models keep SAM's own.

Tolerances (float32): forward atol 2e-5 / rtol 1e-4, gradients atol 1e-4 / rtol 1e-3 (the sums run in another
order, nothing else differs). Under bf16 autocast both implementations round to bf16; ours must stay within
the bound stated in BF16_TOLERANCE of the float32 reference, as SAM's own bf16 result does.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block

from nnunet_sam.backbones.attention import check_attention, decomposed_attention, sam_attention
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone, run_vit_block
from nnunet_sam.blocks.checkpointing import block_checkpointing
from nnunet_sam.blocks.volumetric_encoder import VolumetricEncoder, shifted_window_axis_masks, shifted_window_mask
from nnunet_sam.model_record import ModelRecord
from nnunet_sam.training.planning import PatchRule, sam_settings

FORWARD = {"atol": 2e-5, "rtol": 1e-4}
GRADIENT = {"atol": 1e-4, "rtol": 1e-3}
BF16_TOLERANCE = 0.05  # max |bf16 - fp32| / max |fp32| of the attention output, ours and SAM's alike


def _random_attention(dim: int, heads: int, grid: int, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    attn = Attention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=(grid, grid))
    with torch.no_grad():
        for p in attn.parameters():  # SAM initialises the tables to zero: random ones test the bias path
            p.normal_(std=0.05 if p.dim() > 1 else 0.5)
    return attn


def _grads(outputs: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    weight = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(seed))
    return list(torch.autograd.grad((outputs * weight).sum(), inputs))


def _compare(reference, ours, inputs: list[torch.Tensor]) -> None:
    expected, got = reference(), ours()
    torch.testing.assert_close(got, expected, **FORWARD)
    for g_ours, g_ref in zip(_grads(got, inputs), _grads(expected, inputs)):
        torch.testing.assert_close(g_ours, g_ref, **GRADIENT)


# ViT-B attention: head width 64; windowed blocks 14x14 tokens, global blocks 32x32 (512 px) and 64x64 (1024 px).
# The 64x64 case keeps ViT-B's head width with 2 heads instead of 12 (heads are independent; saves CPU time).
@pytest.mark.parametrize(("dim", "heads", "grid", "batch"), [(768, 12, 14, 3), (768, 12, 32, 1), (128, 2, 64, 1)])
def test_vit_b_attention_equals_segment_anything(dim, heads, grid, batch):
    attn = _random_attention(dim, heads, grid)
    x = torch.randn(batch, grid, grid, dim, requires_grad=True)
    inputs = [x, *attn.parameters()]  # qkv, proj, rel_pos_h, rel_pos_w
    _compare(lambda: attn(x), lambda: sam_attention(attn, x, "sdpa"), inputs)


def test_windowed_block_with_padding_equals_segment_anything():
    """A ViT-B windowed block on a 20x20 grid: windows of 14 padded to 28, as segment-anything pads them."""
    torch.manual_seed(0)
    block = Block(768, 12, qkv_bias=True, use_rel_pos=True, window_size=14, input_size=(14, 14))
    with torch.no_grad():
        block.attn.rel_pos_h.normal_(std=0.5)
        block.attn.rel_pos_w.normal_(std=0.5)
    x = torch.randn(2, 20, 20, 768, requires_grad=True)

    def ours():
        return run_vit_block(block, x, lambda h: h, torch.zeros_like, "sdpa")

    _compare(lambda: block(x), ours, [x, *block.parameters()])


def test_attention_under_bf16_autocast_stays_within_the_stated_tolerance():
    attn = _random_attention(768, 12, 14)
    x = torch.randn(2, 14, 14, 768)
    with torch.no_grad():
        reference = attn(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = sam_attention(attn, x, "sdpa"), attn(x)
    assert ours.dtype == torch.bfloat16
    scale = reference.abs().max()
    error_ours = (ours.float() - reference).abs().max() / scale
    error_sam = (theirs.float() - reference).abs().max() / scale
    assert error_ours < BF16_TOLERANCE and error_sam < BF16_TOLERANCE, (error_ours, error_sam)
    assert error_ours < 2 * error_sam + 1e-3, f"ours {error_ours:.4f} vs segment-anything's {error_sam:.4f} in bf16"


def test_decomposed_attention_equals_an_explicit_bias_on_a_3d_grid():
    torch.manual_seed(0)
    grid = (2, 3, 4)
    n = 24
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    biases = [torch.randn(2, 3, n, m) for m in grid]
    coords = torch.stack(torch.meshgrid(*(torch.arange(m) for m in grid), indexing="ij")).reshape(3, -1)
    bias = sum(b[..., c] for b, c in zip(biases, coords))  # (2, 3, n, n): bias[i, j] = sum_a b_a[i, coord_a(j)]
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.25 + bias, -1) @ v
    torch.testing.assert_close(decomposed_attention(q, k, v, biases, grid, 0.25), expected, **FORWARD)


def test_per_axis_shift_masks_equal_the_swin_mask():
    grid, dims, shift = (8, 8, 4), (4, 4, 4), (2, 2, 0)
    full = shifted_window_mask(grid, dims, shift)  # (nW, N, N), -inf between regions
    axis = shifted_window_axis_masks(grid, dims, shift)
    assert axis[2] is None, "no shift along an axis with one window"
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in dims), indexing="ij")).reshape(3, -1)
    summed = sum(m[..., c] for m, c in zip(axis, coords) if m is not None)  # (nW, N, N)
    assert torch.equal(summed < 0, torch.isinf(full))


def _volumetric_pair(seed: int = 0) -> tuple[VolumetricEncoder, VolumetricEncoder, torch.nn.Module]:
    tiny = get_backbone("tiny")
    torch.manual_seed(seed)
    sam = build_sam(tiny, 64)  # 8x8 tokens: 2x2 in-plane windows of 4
    with torch.no_grad():
        for block in sam.image_encoder.blocks:
            block.attn.rel_pos_h.normal_(std=0.5)
            block.attn.rel_pos_w.normal_(std=0.5)
    args = (tiny.embed_dim, tiny.num_heads, tiny.depth, 16, 8, 2, 4)  # 16 slices / 2 = 8 depth tokens: 2 windows
    legacy = VolumetricEncoder(*args, attention="sam")
    with torch.no_grad():
        legacy.rel_pos_d.normal_(std=0.5)
        for adapter in legacy.adapters:
            adapter.up.weight.normal_(std=0.1)
    ours = VolumetricEncoder(*args, attention="sdpa")
    ours.load_state_dict(legacy.state_dict())
    return legacy, ours, sam.image_encoder


def test_volumetric_shifted_3d_windows_equal_the_explicit_bias_and_mask():
    legacy, ours, vit = _volumetric_pair()
    assert any(any(s) for s in ours.shifts), "odd blocks shift the 2x2x2 windows"
    x = torch.randn(1, 3, 16, 64, 64, requires_grad=True)
    trainable = [x, *ours.parameters(), *(p for n, p in vit.named_parameters() if "norm" in n or "rel_pos" in n)]
    legacy_params = [x, *legacy.parameters(), *trainable[1 + len(list(ours.parameters())) :]]

    def run(encoder):
        embedding, features = encoder(vit, x)
        return torch.cat([embedding.flatten(), *(f.flatten() for f in features)])

    expected, got = run(legacy), run(ours)
    torch.testing.assert_close(got, expected, **FORWARD)
    for g_ours, g_ref in zip(_grads(got, trainable), _grads(expected, legacy_params)):
        torch.testing.assert_close(g_ours, g_ref, **GRADIENT)


def test_checkpointed_blocks_give_the_same_values_and_gradients():
    _, ours, vit = _volumetric_pair()
    x = torch.randn(1, 3, 16, 64, 64, requires_grad=True)
    plain = ours(vit, x)[0]
    with block_checkpointing():
        checkpointed = ours(vit, x)[0]
    torch.testing.assert_close(checkpointed, plain)
    params = [x, *ours.parameters()]
    for a, b in zip(_grads(checkpointed, params), _grads(plain, params)):
        torch.testing.assert_close(a, b)


def test_records_choose_the_implementation_and_old_records_keep_segment_anything():
    spec = get_backbone("tiny")
    record = sam_settings({"patch_size": [4, 64, 64]}, spec, PatchRule(4, 2), 4)
    assert record["attention"] == "sdpa", "new trainings record the memory-efficient attention"
    legacy = {k: v for k, v in record.items() if k != "attention"}
    legacy_record = ModelRecord.from_block(legacy, None)
    assert legacy_record.attention == "sam", "a block saved before the field existed rebuilds SAM's own"
    with pytest.raises(ValueError, match="Known: sam, sdpa"):
        check_attention("flash")


def test_a_legacy_record_runs_the_code_of_the_previous_release():
    """Bit-identity of old models: built from a record without ``attention``, the folded methods call every SAM
    Attention module's own forward (as before) and the volumetric encoder keeps its (N, N) bias and Swin mask;
    built from a new record, no Attention module's forward runs."""
    from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
    from nnunet_sam.trainers.sam3d_adapter import SAM3DAdapterTrainer_tiny

    record = sam_settings({"patch_size": [4, 64, 64]}, get_backbone("tiny"), MaskSAMTrainer_tiny.patch_rule(), 3)
    legacy = {k: v for k, v in record.items() if k != "attention"}
    x = torch.randn(1, 1, *record["patch_size"])
    for rec, expected in ((legacy, 4), (record, 0)):  # tiny: 4 blocks
        net = MaskSAMTrainer_tiny.build_network(rec, 1, 3).eval()
        calls = []
        for m in net.sam.image_encoder.modules():
            if isinstance(m, Attention):
                m.register_forward_hook(lambda *a, c=calls: c.append(1))
        with torch.no_grad():
            net(x)
        assert len(calls) == expected

    rule = SAM3DAdapterTrainer_tiny.patch_rule()
    record = sam_settings({"patch_size": [16, 64, 64]}, get_backbone("tiny"), rule, 3)
    legacy = {k: v for k, v in record.items() if k != "attention"}
    old, new = (SAM3DAdapterTrainer_tiny.build_network(r, 1, 3).encoder for r in (legacy, record))
    assert old.attention == "sam" and old.shift_mask is not None
    assert new.attention == "sdpa" and not hasattr(new, "shift_mask")
