"""PanSAM: prompt-free coarse-to-fine SAM for one target structure, on folded-depth patches.

Composition only: SAM's frozen image encoder runs once per slice (no adapters, no depth embedding, a plain stem)
and its embedding feeds three stages:

1. prompt-free segmentor: SAM's own mask decoder (``sam.mask_decoder``), fine-tuned with no prompt (SAM's frozen
   "no mask" dense embedding) -> per-slice logits, whose sigmoid is the probability map O;
2. prompt-based segmentor: a copy of SAM's prompt encoder and mask decoder (``prompt_encoder``,
   ``refine_decoder``, initialised from SAM's weights) fed the points that
   :func:`~nnunet_sam.prompting.pansam_points.generate_points` samples from O (or from a reference mask);
3. :class:`~nnunet_sam.blocks.aggregator_3d.SliceAggregator3D` over the stacked per-slice logits of the D
   slices of the patch.

Optional CLAHE preprocessing (per slice: min-max to [0, 1], CLAHE with an 8x8 tile grid and OpenCV-style clip
limit 2.0, min-max again, then SAM's pixel normalisation) runs inside ``forward``, so training and prediction
apply it identically (on the network's patches).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from skimage.exposure import equalize_adapthist
from torch import nn

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.backbones.contract import SOFT_TISSUE_WINDOW_HU
from nnunet_sam.blocks.aggregator_3d import SliceAggregator3D
from nnunet_sam.blocks.folded_sam import STOCK_SAM, FoldedSAM
from nnunet_sam.prompting.pansam_points import LEGACY_POINTS, PointPromptConfig, generate_points

Output = Literal["coarse", "coarse_aggregated", "refined", "final"]
OUTPUTS: tuple[str, ...] = ("coarse", "coarse_aggregated", "refined", "final")
STAGE_OUTPUT: dict[int, Output] = {1: "coarse", 2: "refined", 3: "final"}
NEGATIVE_LOGIT = -1e4  # classes other than background and the target in a multi-class label map


@dataclass(frozen=True)
class PanSAMOptions:
    """Network options (class attribute ``options`` of a PanSAM trainer, saved in the model's record).

    ``target_label``: the label value of the structure (the trainer fills in its ``target_label``).
    ``ct_window_hu``: CT channels are clipped to this window in HU (nnU-Net's ``NoNormalization`` of the HU plans, or
    HU recovered from ``CTNormalization`` z-scores, exact inside nnU-Net's clipping range) and scaled to [0, 1]
    before CLAHE, as RadSAM windows them; other channels go to CLAHE's min-max as they are."""

    target_label: int = 1
    # CT channels windowed in HU before CLAHE (None: CLAHE's min-max of nnU-Net's values, as models saved before did)
    ct_window_hu: tuple[float, float] | None = field(default=SOFT_TISSUE_WINDOW_HU, metadata={"legacy": None})
    clahe: bool = True
    clahe_tiles: int = 8
    clahe_clip: float = 2.0  # OpenCV's clipLimit (a multiple of the mean histogram bin count)
    points: PointPromptConfig = field(default_factory=PointPromptConfig, metadata={"legacy": LEGACY_POINTS})
    point_seed: int = 0  # points at inference are sampled with a generator seeded with this value
    aggregator_hidden: int = 16
    aggregator_layers: int = 2


def clahe_slices(x: torch.Tensor, tiles: int = 8, clip: float = 2.0) -> torch.Tensor:
    """CLAHE of every slice x (S, H, W) -> (S, H, W) in [0, 1] (min-max, CLAHE, min-max; constant slices -> 0).

    scikit-image's ``equalize_adapthist`` with ``tiles`` x ``tiles`` tiles; its clip limit is a fraction of the
    tile's pixels, OpenCV's a multiple of the mean bin count, so OpenCV's ``clip`` is ``clip / nbins`` here. No
    gradient flows through it. A PyTorch custom operator (``nnunet_sam::clahe_slices``), so that tensors without
    values (fake or meta: the benchmark's memory and FLOP traces) pass through it with their shape.
    """
    return _clahe_op(x.detach(), tiles, clip)


@torch.library.custom_op("nnunet_sam::clahe_slices", mutates_args=())
def _clahe_op(x: torch.Tensor, tiles: int, clip: float) -> torch.Tensor:
    nbins = 256
    h, w = x.shape[-2:]
    kernel = (max(1, h // tiles), max(1, w // tiles))

    def minmax(a: np.ndarray) -> np.ndarray:
        lo, hi = float(a.min()), float(a.max())
        return np.zeros_like(a) if hi - lo < 1e-8 else (a - lo) / (hi - lo)

    out = []
    for s in x.float().cpu().numpy():
        s = minmax(s)
        if s.max() > 0:
            s = minmax(equalize_adapthist(s, kernel_size=kernel, clip_limit=clip / nbins, nbins=nbins))
        out.append(s.astype(np.float32))
    return torch.from_numpy(np.stack(out)).to(x.device, x.dtype)


@_clahe_op.register_fake
def _(x: torch.Tensor, tiles: int, clip: float) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _grad_if(modules: Sequence[nn.Module]):
    """Record gradients through ``modules`` only if one of their parameters needs them (frozen stages run once)."""
    needed = any(p.requires_grad for m in modules for p in m.parameters())
    return nullcontext() if needed else torch.no_grad()


class PanSAMNetwork(FoldedSAM):
    """Input (B, M, D, P, P) (+1 channel holding a reference mask with ``reference_prompts=True``); output
    (B, C, D, P, P) class logits: 0 for background, the selected stage's logit for ``options.target_label``,
    ``NEGATIVE_LOGIT`` for any other class, so softmax gives sigmoid(logit) for the target.

    ``forward(x, return_all=None, output="final", reference_prompts=False)``: ``output`` selects what the network
    returns: "coarse" (stage 1), "coarse_aggregated" (stage 1 through the aggregator, skipping the prompts),
    "refined" (stage 2), "final" (stage 3 on stage 2: the full pipeline); ``reference_prompts`` draws stage 2's
    points from the reference mask in the last input channel instead of from stage 1's map (evaluation rows).
    With ``return_all`` (default in training mode) forward returns {"logits": (B, 1, D, P, P) target logits,
    "semantic": class logits, "points", "labels": (B * D, K, 2) / (B * D, K) when prompts were used}.
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        sam_input_size: int,
        options: PanSAMOptions | None = None,
        attention: AttentionImpl = DEFAULT_ATTENTION,
    ) -> None:
        options = options or PanSAMOptions()
        target_label = options.target_label
        assert len(patch_size) == 3, (
            f"PanSAM needs 3D patches [D, P, P] (its aggregator works across slices), got {list(patch_size)}"
        )
        assert 1 <= target_label < num_classes, f"target label {target_label} not in 1..{num_classes - 1}"
        super().__init__(backbone, in_channels, patch_size, sam_input_size, STOCK_SAM, attention)
        self.options = options
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.target_label = target_label
        self.prompt_encoder = copy.deepcopy(self.sam.prompt_encoder)
        self.refine_decoder = copy.deepcopy(self.sam.mask_decoder)
        self.aggregator = SliceAggregator3D(self.options.aggregator_hidden, self.options.aggregator_layers)
        self.pixel_spacing: tuple[float, float] | None = None  # mm per row/column of the patch (set_pixel_spacing)
        self.windows: list[tuple[float, float] | None] = [None] * in_channels  # (scale, shift) of CT channels
        for m in self.stage_modules(1) + self.stage_modules(2) + self.stage_modules(3):
            m.requires_grad_(True)

    # ---- stages -----------------------------------------------------------------------------------------------
    def stage_modules(self, stage: int, train_encoder: bool = False) -> list[nn.Module]:
        """Modules trained in ``stage`` (1, 2, 3); ``train_encoder`` adds SAM's encoder and prompt encoder to
        stage 1 (random SAM weights, no checkpoint: frozen random features would teach the decoder nothing)."""
        if stage == 1:
            extra = [self.sam.image_encoder, self.sam.prompt_encoder] if train_encoder else []
            return [self.sam.mask_decoder, *extra]
        if stage == 2:
            return [self.prompt_encoder, self.refine_decoder]
        assert stage == 3, f"PanSAM has stages 1, 2, 3, got {stage}"
        return [self.aggregator]

    def set_stage(self, stage: int, train_encoder: bool = False) -> None:
        """Only ``stage``'s modules need gradients (its output is ``forward(..., output=STAGE_OUTPUT[stage])``)."""
        self.requires_grad_(False)
        for m in self.stage_modules(stage, train_encoder):
            m.requires_grad_(True)

    def set_pixel_spacing(self, spacing: Sequence[float]) -> None:
        """In-plane spacing (mm per row, per column) of the patches, from the plans' configuration: the point
        generator's windows are in millimetres (``options.points.window_unit_mm``); unset, they count pixels."""
        self.pixel_spacing = (float(spacing[-2]), float(spacing[-1]))

    def set_intensity_windows(self, windows: Sequence[tuple[float, float] | None]) -> None:
        """Per input channel the (scale, shift) that maps nnU-Net's values to the CT window's [0, 1] (``clip(scale * x
        + shift, 0, 1)``, from the plans: see :meth:`PanSAMTrainer.configure_from_plans`), None for other channels."""
        assert len(windows) == self.in_channels, f"{len(windows)} windows for {self.in_channels} channels"
        self.windows = list(windows)

    def init_prompt_stage_from_sam(self) -> None:
        """Start stage 2's prompt encoder and mask decoder from SAM's (after SAM's weights were loaded)."""
        self.prompt_encoder.load_state_dict(self.sam.prompt_encoder.state_dict())
        self.refine_decoder.load_state_dict(self.sam.mask_decoder.state_dict())

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        return_all: bool | None = None,
        output: Output = "final",
        reference_prompts: bool = False,
    ) -> torch.Tensor | dict:
        return_all = self.training if return_all is None else return_all
        assert output in OUTPUTS, f"output must be one of {OUTPUTS}, got {output!r}"
        reference = None
        expected = self.in_channels + reference_prompts
        assert x.shape[1] == expected, (
            f"input has {x.shape[1]} channels, expected {expected} (reference_prompts={reference_prompts})"
        )
        if reference_prompts:
            x, reference = x[:, :-1], x[:, -1]  # (B, D, P, P)
        b, d, p = x.shape[0], self.depth, self.patch
        out: dict = {}

        with _grad_if([self.sam.image_encoder]):
            embedding, _ = self.encode(self._prepare(x))  # (B * D, C, g, g)
        with _grad_if([self.sam.mask_decoder]) if output.startswith("coarse") else torch.no_grad():
            logits = self._decode_without_prompts(embedding)  # (B * D, P, P)
        if output in ("refined", "final"):
            source = logits.sigmoid() if reference is None else reference.reshape(b * d, p, p).float()
            generator = None
            if not self.training and not x.is_meta:  # meta tensors (FLOP counts) have no generator and no values
                generator = torch.Generator(device=x.device).manual_seed(self.options.point_seed)
            config = self.options.points.in_pixels(self.pixel_spacing)
            points, labels = generate_points(source, self.input_size, config, generator)
            with _grad_if(self.stage_modules(2)) if output == "refined" else torch.no_grad():
                logits = self._decode_with_points(embedding, points, labels)
            out.update(points=points, labels=labels)
        logits = logits.reshape(b, 1, d, p, p)
        if output in ("coarse_aggregated", "final"):
            logits = self.aggregator(logits)
        out["logits"] = logits
        out["semantic"] = self._to_classes(logits)
        return out if return_all else out["semantic"]

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """CT window (``options.ct_window_hu``), optional CLAHE per slice and channel, then SAM's pixel normalisation.
        x (B, M, D, P, P), same shape. Models saved before the window: CLAHE (or nothing) on nnU-Net's values."""
        if self.options.ct_window_hu is not None:
            windowed = [c if w is None else (c * w[0] + w[1]).clamp(0, 1) for c, w in zip(x.unbind(1), self.windows)]
            x = torch.stack(windowed, 1)
        elif not self.options.clahe:
            return x
        shape = x.shape
        mean = self.sam.pixel_mean.mean() / 255.0  # one channel, repeated to SAM's 3 by the plain stem
        std = self.sam.pixel_std.mean() / 255.0
        if not self.options.clahe:
            return (x - mean) / std
        eq = clahe_slices(x.reshape(-1, *shape[-2:]), self.options.clahe_tiles, self.options.clahe_clip)
        return ((eq - mean) / std).reshape(shape)

    def _to_classes(self, logits: torch.Tensor) -> torch.Tensor:
        """Target logits (B, 1, D, P, P) -> class logits (B, C, D, P, P)."""
        classes = torch.full(
            (logits.shape[0], self.num_classes, *logits.shape[2:]), NEGATIVE_LOGIT, device=logits.device
        ).to(logits.dtype)
        classes[:, 0] = 0
        classes[:, self.target_label] = logits[:, 0]
        return classes

    def _decode_without_prompts(self, embedding: torch.Tensor) -> torch.Tensor:
        """Stage 1: SAM's mask decoder with SAM's frozen "no prompt" embeddings. (B * D, C, g, g) -> (B * D, P, P)."""
        rows, c, g = embedding.shape[0], embedding.shape[1], embedding.shape[-1]
        sparse = embedding.new_zeros(rows, 0, c)
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(rows, -1, g, g)
        return self.decode(embedding, 1, sparse, dense)[0]

    def _decode_with_points(self, embedding: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Stage 2: the prompt-based segmentor. points (B * D, K, 2) (x, y), labels (B * D, K) -> (B * D, P, P)."""
        sparse, dense = self.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        pe = self.prompt_encoder.get_dense_pe()
        return self.decode(embedding, 1, sparse, dense, decoder=self.refine_decoder, dense_pe=pe)[0]
