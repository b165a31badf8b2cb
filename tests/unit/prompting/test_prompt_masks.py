"""Mask prompts keep thin structures: 1- and 2-px lines at every phase of SAM's 4-px mask-prompt grid."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nnunet_sam.network_architectures.masksam import MaskSAMNetwork, MaskSAMOptions
from nnunet_sam.network_architectures.self_prompt_sam import (
    SelfPromptSAMNetwork,
    SelfPromptSAMOptions,
    class_prompts,
)
from nnunet_sam.prompting.from_masks import prompt_mask

# (width, phase, vertical): a line of `width` px starting at 16 + phase, i.e. at every offset in a 4-px cell
LINES = [(w, phase, vertical) for w in (1, 2) for phase in range(4) for vertical in (False, True)]


def _line(size: int, width: int, start: int, vertical: bool, inside: float = 8.0, outside: float = -8.0):
    """(size, size) logits: `inside` on a full-length line of `width` px from `start`, `outside` elsewhere."""
    logits = torch.full((size, size), outside)
    if vertical:
        logits[:, start : start + width] = inside
    else:
        logits[start : start + width] = inside
    return logits


@pytest.mark.parametrize("width,phase,vertical", LINES)
def test_area_reduction_keeps_a_thin_line_in_exactly_its_cells(width, phase, vertical):
    start = 16 + phase
    out = prompt_mask(_line(64, width, start, vertical)[None], 16)[0]  # ViT's 4x reduction
    cells = sorted({(start + i) // 4 for i in range(width)})
    expected = torch.zeros(16, 16, dtype=torch.bool)
    if vertical:
        expected[:, cells] = True
    else:
        expected[cells] = True
    assert torch.equal(out > 0, expected)


def test_area_reduction_is_the_cell_mean_where_the_mean_decides():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 32, 32) * 3
    out = prompt_mask(logits, 8)
    mean, peak = F.avg_pool2d(logits, 4), F.max_pool2d(logits, 4)
    decided = (mean > 0) | (peak <= 0)
    torch.testing.assert_close(out[decided], mean[decided])
    torch.testing.assert_close(out[~decided], peak[~decided])
    assert ((peak > 0) == (out > 0)).all(), "a cell is foreground exactly when one of its pixels is"
    # enlarging stays bilinear
    small = torch.randn(1, 2, 8, 8)
    torch.testing.assert_close(prompt_mask(small, 16), F.interpolate(small, size=(16, 16), mode="bilinear"))


def test_bilinear_mode_is_the_old_resize_and_loses_thin_lines():
    logits = torch.randn(2, 3, 64, 64)
    old = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(prompt_mask(logits, 16, "bilinear"), old, rtol=0, atol=0)
    lost = [(w, p, v) for w, p, v in LINES if not (prompt_mask(_line(64, w, 16 + p, v), 16, "bilinear") > 0).any()]
    assert lost, "the old resize was expected to drop some thin lines"


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("width,phase,vertical", LINES)
def test_self_prompt_class_prompts_keep_a_thin_class(width, phase, vertical, background):
    """A class present at full resolution gets a mask, a box around it and a real point (label 1)."""
    start = 16 + phase
    aux = torch.zeros(1, 3, 64, 64)
    aux[0, 0] = 6.0  # background elsewhere
    aux[0, 1, 4:12, 4:60] = 12.0  # a large class 1
    line = _line(64, width, start, vertical, inside=12.0, outside=0.0)
    aux[0, 2] = line  # the thin class 2
    masks, boxes, points, labels = class_prompts(aux, 16, 64, background)
    thin = 2 if background else 1  # index of class 2 among the prompted classes
    assert masks.shape == (1, 3 if background else 2, 16, 16)
    assert (labels == 1).all(), f"a present class got a padding point: {labels.tolist()}"
    x1, y1, x2, y2 = boxes[0, thin].tolist()
    lo, hi = 4 * (start // 4), 4 * ((start + width - 1) // 4 + 1)  # the line's cells, in input pixels
    assert (x1, x2) == ((lo, hi) if vertical else (0.0, 64.0))
    assert (y1, y2) == ((0.0, 64.0) if vertical else (lo, hi))
    col, row = ((points[0, thin] + 0.5) / 4).floor().long().tolist()
    assert masks[0, thin, row, col] > 0, "the point must lie on the thin class"


def test_masksam_feeds_sam_the_thin_line_and_old_models_keep_the_old_prompt():
    """The network wiring: the mask prompt SAM receives keeps a 1-px line (tiny backbone: 2x reduction)."""
    captured = {}
    results = {}
    thin = torch.full((4, 4, 32, 32), -8.0)
    thin[..., 11] = 8.0  # a 1-px vertical line at an odd column: bilinear 2x averages it with its neighbour

    def replace_masks(module, args, out):
        return dataclasses.replace(out, masks=thin.to(out.masks.dtype))

    for resize in ("area", "bilinear"):
        torch.manual_seed(0)
        net = MaskSAMNetwork("tiny", 1, 3, 4, (2, 32, 32), 32, MaskSAMOptions(mask_prompt_resize=resize))

        def capture(module, args, kwargs):
            captured["masks"] = kwargs["masks"]

        net.prompt_generator.register_forward_hook(replace_masks)
        net.sam.prompt_encoder.register_forward_pre_hook(capture, with_kwargs=True)
        with torch.no_grad():
            net(torch.randn(2, 1, 2, 32, 32))
        results[resize] = captured["masks"]
    assert results["area"].shape == (2 * 4 * 2, 1, 16, 16)
    assert (results["area"][:, 0, :, 5] > 0).all(), "every row's prompt must hold the line"
    assert not (results["bilinear"] > 0).any(), "the old resize (kept for old models) drops the line"


def test_self_prompt_sam_prompts_every_class_including_background_by_default():
    captured = {}
    assert SelfPromptSAMOptions().prompt_background
    field = {f.name: f for f in dataclasses.fields(SelfPromptSAMOptions)}["prompt_background"]
    assert field.metadata["legacy"] is False, "models saved before the option must keep foreground-only prompts"
    for background in (True, False):
        torch.manual_seed(0)
        options = SelfPromptSAMOptions(prompt_background=background)
        net = SelfPromptSAMNetwork("tiny", 1, 3, (2, 32, 32), 32, options)
        net.sam.prompt_encoder.register_forward_pre_hook(
            lambda m, a, kw: captured.__setitem__("boxes", kw["boxes"]), with_kwargs=True
        )
        out = net(torch.randn(2, 1, 2, 32, 32), return_all=True)
        k = 3 if background else 2
        assert out["binary"].shape == (2, 2, k, 32, 32)
        assert captured["boxes"].shape[0] == 2 * k * 2, "one decoder row per prompted class and slice"
        assert out["logits"].shape == (2, 3, 2, 32, 32)
        if background:  # at initialisation the MC-Adapter passes the C binary logits through as the class logits
            torch.testing.assert_close(out["logits"], out["binary"].permute(0, 2, 1, 3, 4))
        else:  # background has a fixed logit of 0
            assert torch.count_nonzero(out["logits"][:, 0]) == 0
