"""RadSAM: SAM as a 2D promptable model for slices (point, box, mask and correction-point prompts).

Composition only: the shared SAM core (:class:`~nnunet_sam.blocks.folded_sam.FoldedSAM`) on 2D patches without
adapters or depth embeddings (RadSAM keeps SAM's architecture and trains SAM itself), an input stem that windows
the intensities (:class:`IntensityWindow`), copies the slice into SAM's three channels (``PlainStem``) and applies
SAM's pixel normalisation, SAM's prompt encoder and SAM's mask decoder (primary mask output at prediction; with
``options.multimask_training`` the simulated-interaction forward of training returns all four of SAM's masks for
the paper's oracle loss). One decoder row per prompt; K prompts per slice are decoded in one batched call.

Intensities (:func:`intensity_windows`): a CT channel is clipped to ``options.ct_window_hu`` and scaled to [0, 1]
(the paper's [-500, 1000] HU for SAM's ViTs; the soft-tissue window MedSAM and LiteMedSAM were trained with for
those backbones). Plans made with ``nnunet_sam_make_hu_plans`` keep CT channels in HU (nnU-Net's
``NoNormalization``), so the window sees the scanner's values. Plans with nnU-Net's ``CTNormalization`` store
z-scores of values already clipped to the training labels' 0.5-99.5 percentiles: HU = x * std + mean is recovered,
but what nnU-Net clipped is lost. Other channels (MR) are z-scores; with the input contract each slice is mapped from
its own 0.5-99.5 percentiles to [0, 1] (LiteMedSAM's rendering of MR), without it [-3, 3] is mapped linearly to
[0, 1].

Input contract (``options.input_contract``, :mod:`nnunet_sam.backbones.contract`): the [0, 1] slice, repeated to
three channels, is fed as the backbone was pretrained: resized to its input size (the record's ``sam_input_size``,
the contract's size for new trainings), min-max normalised where the backbone was (MedSAM, LiteMedSAM), scaled and
normalised with SAM's pixel statistics only for SAM's own ViTs, padded with 0 after normalisation; prompt
coordinates are scaled as SAM's ``apply_coords`` does; :meth:`RadSAMNetwork.segment_slice` takes a whole slice of any
shape (longest side resized, cropped and resized back as SAM's ``postprocess_masks``). ``options.prompt_tokens``
"sam" gives each prompt exactly SAM's tokens (a box alone has no padding point); "padded" gives every row the same
token count (points padded with SAM's not-a-point token, two of them where a row has no box), which batched training
on mixed prompt kinds needs. Models saved before the contract (``input_contract`` False) keep the stem they were
trained with: the window, PlainStem at the patch size, SAM's pixel statistics for every backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.backbones.contract import InputContract, input_contract
from nnunet_sam.blocks.folded_sam import STOCK_SAM, FoldedSAM
from nnunet_sam.prompting.radsam_prompts import Prompts, SimulatedInteraction

CT_WINDOW_HU = (-500.0, 1000.0)
CT_SCHEMES = ("CTNormalization", "NoNormalization")  # plans' schemes of channels the CT window applies to
ZSCORE_WINDOW = (-3.0, 3.0)


@dataclass(frozen=True)
class RadSAMOptions:
    """Network options (class attribute ``options`` of a RadSAM trainer, saved in the model's record).

    ``ct_window_hu``: CT intensities are clipped to this window and scaled to [0, 1] (the paper's [-500, 1000] HU).
    ``multimask_training``: in the simulated-interaction (training) forward, decode all four of SAM's masks, so
    that the loss is the primary mask's plus the best of the three others (the paper); predictions always use the
    primary mask, so this changes training only. Models saved before it existed trained the primary mask alone.
    ``input_contract``: feed the backbone as it was pretrained (module docstring); False for models saved before.
    ``prompt_tokens``: "sam" (each prompt exactly as SAM encodes it) or "padded" (one token count for all rows).
    ``propagation``: how a 3D mask grows from slice to slice (:mod:`nnunet_sam.inference.radsam`): "mask" (the
    neighbour's mask as mask prompt, what RadSAM trains) or "box" (the neighbour's mask box, for a model never
    trained with mask prompts).
    ``native_spacing``: prediction keeps each image's own in-plane spacing instead of the plans' (a model that was
    not trained on one dataset: the zero-shot models of ``nnunet_sam_make_zero_shot``).
    """

    ct_window_hu: tuple[float, float] = CT_WINDOW_HU
    multimask_training: bool = field(default=True, metadata={"legacy": False})
    input_contract: bool = field(default=True, metadata={"legacy": False})
    prompt_tokens: Literal["sam", "padded"] = field(default="padded", metadata={"legacy": "padded"})
    propagation: Literal["mask", "box"] = field(default="mask", metadata={"legacy": "mask"})
    native_spacing: bool = field(default=False, metadata={"legacy": False})


def random_ct_windows(
    windows: Sequence[tuple[float, float]],
    normalization_schemes: Sequence[str],
    intensity_properties: dict[str, dict],
    ct_window_hu: tuple[float, float],
    jitter: float,
    count: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """HU-window augmentation: per sample and input channel, the (scale, shift) to apply to nnU-Net's normalised
    intensities x before the network's own window (``windows``, see :func:`intensity_windows`) so that the
    network sees ``clip((HU - low') / (high' - low'), 0, 1)`` for a random window: each bound of ``ct_window_hu``
    moved by a uniform amount in [-jitter, +jitter] x its width. Non-CT channels and ``jitter`` 0 get the
    identity (1, 0). Returns (count, M, 2).
    """
    out = torch.zeros(count, len(windows), 2)
    out[..., 0] = 1.0
    low, high = ct_window_hu
    width = high - low
    for m, scheme in enumerate(normalization_schemes):
        if scheme not in CT_SCHEMES or jitter <= 0:
            continue
        moves = (torch.rand(count, 2, generator=generator) * 2 - 1) * jitter * width
        new_low, new_high = low + moves[:, 0], high + moves[:, 1]
        new_high = torch.maximum(new_high, new_low + 0.05 * width)  # never a reversed or empty window
        props = intensity_properties[str(m)] if scheme == "CTNormalization" else {"std": 1.0, "mean": 0.0}  # HU
        scale, shift = windows[m]
        # the network computes scale * x' + shift; we want (HU - new_low) / (new_high - new_low), HU = x*std+mean
        target_scale = props["std"] / (new_high - new_low)
        target_shift = (props["mean"] - new_low) / (new_high - new_low)
        out[:, m, 0] = target_scale / scale
        out[:, m, 1] = (target_shift - shift) / scale
    return out


def apply_windows(x: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """x (B, M, ...) -> x * affine[:, :, 0] + affine[:, :, 1], per sample and channel (affine (B, M, 2))."""
    shape = (*affine.shape[:2], *([1] * (x.dim() - 2)))
    affine = affine.to(x.device, x.dtype)
    return x * affine[..., 0].view(shape) + affine[..., 1].view(shape)


def intensity_windows(
    normalization_schemes: Sequence[str],
    intensity_properties: dict[str, dict],
    ct_window_hu: tuple[float, float] = CT_WINDOW_HU,
) -> list[tuple[float, float]]:
    """Per input channel (scale, shift) such that ``clip(scale * x + shift, 0, 1)`` is RadSAM's [0, 1] image.

    ``normalization_schemes`` and ``intensity_properties`` (``foreground_intensity_properties_per_channel``) come
    from nnU-Net's plans; CT channels (``CTNormalization``: z-scores; ``NoNormalization``: HU, as
    ``nnunet_sam_make_hu_plans`` plans them) use ``ct_window_hu``; see the module docstring for the rule.
    """
    windows = []
    for channel, scheme in enumerate(normalization_schemes):
        low, high = ct_window_hu
        if scheme == "CTNormalization":
            props = intensity_properties[str(channel)]
            windows.append((props["std"] / (high - low), (props["mean"] - low) / (high - low)))
        elif scheme == "NoNormalization":
            windows.append((1.0 / (high - low), -low / (high - low)))
        else:
            low, high = ZSCORE_WINDOW
            windows.append((1.0 / (high - low), -low / (high - low)))
    return windows


class IntensityWindow(nn.Module):
    """(S, M, H, W) nnU-Net-normalised slices -> ``clip(scale_m * x + shift_m, 0, 1)`` per channel m."""

    def __init__(self, windows: Sequence[tuple[float, float]]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([w[0] for w in windows]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor([w[1] for w in windows]).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.scale.shape[1], f"{x.shape[1]} channels, windows for {self.scale.shape[1]}"
        return (x * self.scale + self.shift).clamp(0, 1)


class ContractStem(nn.Module):
    """(S, M, h, w) slices in the plans' intensities -> the backbone's input (S, 3, size, size) by its contract.

    Per channel: a fixed window ``clip(scale * x + shift, 0, 1)`` (CT), or, where the window is None (z-scored MR),
    the slice's own 0.5-99.5 percentiles of the pixels above its minimum; then the channel mean repeated to three
    channels and :meth:`~nnunet_sam.backbones.contract.InputContract.to_input` (resize, min-max, normalise, pad).
    """

    def __init__(self, windows: Sequence[tuple[float, float] | None], contract: InputContract, size: int) -> None:
        super().__init__()
        self.windows = list(windows)
        self.contract = contract
        self.input_size = size

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """(S, M, h, w) -> the grey [0, 1] image (S, 1, h, w)."""
        assert x.shape[1] == len(self.windows), f"{x.shape[1]} channels, windows for {len(self.windows)}"
        channels = []
        for m, w in enumerate(self.windows):
            c = x[:, m]
            if w is None:
                channels.append(_percentile_window(c))
            else:
                channels.append((c * w[0] + w[1]).clamp(0, 1))
        return torch.stack(channels, 1).mean(1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.contract.to_input(self.unit(x).expand(-1, 3, -1, -1), self.input_size)


def _percentile_window(c: torch.Tensor) -> torch.Tensor:
    """Slices (S, h, w) -> [0, 1] from each slice's 0.5 and 99.5 percentiles of the pixels above its minimum (a slice
    with fewer than two such pixels -> 0). No data-dependent shapes, so it traces on fake tensors too."""
    flat = c.flatten(1).float()
    body = torch.where(flat > flat.amin(1, keepdim=True), flat, torch.nan)
    levels = torch.tensor([0.005, 0.995], device=c.device)
    low, high = torch.nanquantile(body, levels, dim=1)  # (S,) each; NaN where a slice has no body pixel
    enough = (~torch.isnan(body)).sum(1) >= 2
    low, high = torch.nan_to_num(low)[:, None, None], torch.nan_to_num(high, nan=1.0)[:, None, None]
    out = ((c.float() - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)
    return torch.where(enough[:, None, None], out, torch.zeros_like(out)).to(c.dtype)


class PixelNormalisation(nn.Module):
    """SAM's preprocessing of a [0, 1] RGB image: ``(255 * x - pixel_mean) / pixel_std``."""

    def __init__(self, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", pixel_mean.detach().clone().view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", pixel_std.detach().clone().view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 255 - self.mean) / self.std


class RadSAMNetwork(FoldedSAM):
    """Slices (B, M, P, P) + prompts of R = B * K rows (K per slice) -> mask logits (B, K, P, P).

    Prompt coordinates are pixels of the P x P slice (:class:`~nnunet_sam.prompting.radsam_prompts.Prompts`).
    ``forward(x, interaction=...)`` (training) simulates the prompts instead: it returns (1 + rounds, B, K, P, P)
    logits, the initial prediction and one per correction round, all decoded from one image embedding; with
    ``options.multimask_training`` (1 + rounds, B, K, 4, P, P), SAM's four masks, the primary first (the next
    round's mask prompt is the primary mask). The input window starts as z-score windows; the trainer sets the
    plans' windows (:meth:`set_intensity_windows`).
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        patch_size: Sequence[int],
        sam_input_size: int,
        options: RadSAMOptions | None = None,
        attention: AttentionImpl = DEFAULT_ATTENTION,
    ) -> None:
        assert len(patch_size) == 2, f"RadSAM is a 2D model: patch must be [P, P], got {list(patch_size)}"
        super().__init__(backbone, in_channels, patch_size, sam_input_size, STOCK_SAM, attention)
        self.options = options or RadSAMOptions()
        self.contract = input_contract(backbone) if self.options.input_contract else None
        if self.contract is not None:
            self.stem = ContractStem([None] * in_channels, self.contract, sam_input_size)
        else:
            windows = intensity_windows(["ZScoreNormalization"] * in_channels, {})
            self.stem = nn.Sequential(
                IntensityWindow(windows), self.stem, PixelNormalisation(self.sam.pixel_mean, self.sam.pixel_std)
            )

    def set_intensity_windows(self, windows: Sequence[tuple[float, float] | None]) -> None:
        """Replace the per-channel (scale, shift) of the input window (see :func:`intensity_windows`); None (input
        contract only): the slice's own percentile window."""
        if self.contract is not None:
            assert len(windows) == len(self.stem.windows), f"{len(windows)} windows for a different channel count"
            self.stem.windows = list(windows)
            return
        assert None not in windows, "percentile windows need the input contract"
        assert len(windows) == self.stem[0].scale.shape[1], f"{len(windows)} windows for a different channel count"
        self.stem[0] = IntensityWindow(windows).to(self.stem[0].scale.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, M, P, P) -> SAM image embeddings (B, C, g, g); with the input contract any (B, M, h, w)."""
        if self.contract is None:
            return self.encode(x)[0]
        return self.encoder_additions(self.sam.image_encoder, self.stem(x))[0]

    def segment_slice(
        self, embedding: torch.Tensor, prompts: Prompts, shape: Sequence[int], all_masks: bool = False
    ) -> torch.Tensor:
        """Input-contract models: embedding (1, C, g, g) of a whole slice of ``shape`` (h, w) and prompts of R rows in
        that slice's pixels (masks (R, h, w)) -> mask logits (R, h, w) (SAM's primary mask, cropped and resized
        back as SAM's ``postprocess_masks``), or (R, 4, h, w) with ``all_masks`` (SAM's four masks, primary first)."""
        assert self.contract is not None, "segment_slice needs a model with the input contract"
        h, w = (int(v) for v in shape)
        sy, sx = self.contract.coordinate_scale(h, w, self.input_size)
        framed = self._to_input_frame(prompts, sy, sx, (h, w))
        sparse, dense = self.embed_prompts(framed)
        rows = prompts.rows
        masks, _ = self.decode(
            embedding.expand(rows, -1, -1, -1), 1, sparse.to(embedding.dtype), dense.to(embedding.dtype),
            all_masks=all_masks, size=self.input_size,
        )  # fmt: skip
        if all_masks:
            return self.contract.to_slice(masks.float(), h, w, self.input_size)
        return self.contract.to_slice(masks[:, None].float(), h, w, self.input_size)[:, 0]

    def _to_input_frame(self, prompts: Prompts, sy: float, sx: float, shape: tuple[int, int]) -> Prompts:
        """Prompts in slice pixels -> the input frame (coordinates times the resize factors, SAM's
        ``apply_coords``; masks resized as the image and padded to the input size)."""
        scale = torch.tensor([sx, sy], device=prompts.points.device)
        masks = prompts.masks
        if _any_set(prompts.has_mask):
            nh, nw = self.contract.resized_shape(*shape, self.input_size)
            fitted = F.interpolate(masks[:, None].float(), size=(nh, nw), mode="bilinear", align_corners=False)
            masks = F.pad(fitted[:, 0], (0, self.input_size - nw, 0, self.input_size - nh)) > 0.5
        else:
            masks = masks.new_zeros(masks.shape[0], self.input_size, self.input_size)
        return replace(
            prompts, points=prompts.points * scale, boxes=prompts.boxes * scale.repeat(2), masks=masks
        )  # fmt: skip

    def forward(
        self, x: torch.Tensor, prompts: Prompts | None = None, interaction: SimulatedInteraction | None = None
    ) -> torch.Tensor:
        """Mask logits (B, K, P, P) for ``prompts``; with a simulated ``interaction`` (reference rows ordered
        (slice, structure)) the logits (1 + rounds, B, K, P, P) of its initial prompts and correction rounds."""
        embedding = self.embed(x)
        if interaction is not None:
            every = self.options.multimask_training
            logits = [self.decode_prompts(embedding, interaction.initial(), every)]
            for _ in range(interaction.rounds):
                primary = logits[-1][:, :, 0] if every else logits[-1]
                logits.append(self.decode_prompts(embedding, interaction.correct(primary.flatten(0, 1)), every))
            return torch.stack(logits)
        if prompts is None:
            raise ValueError(
                "RadSAM segments what a prompt points at and has no prompt-free output: use "
                "nnunet_sam.inference.radsam "
                "(segment_from_prompt, nnunet_sam_segment_radsam) or nnunet_sam_benchmark_radsam instead of "
                "nnUNetv2_predict."
            )
        return self.decode_prompts(embedding, prompts)

    def decode_prompts(self, embedding: torch.Tensor, prompts: Prompts, all_masks: bool = False) -> torch.Tensor:
        """Embeddings (B, C, g, g) and prompts of R = B * K rows -> mask logits (B, K, P, P) (SAM's primary mask),
        or (B, K, 4, P, P) with ``all_masks`` (SAM's four masks, the primary first)."""
        b, rows = embedding.shape[0], prompts.rows
        assert rows % b == 0, f"{rows} prompt rows for {b} slices: need the same number K of prompts per slice"
        assert prompts.masks.shape[-2:] == (self.patch, self.patch), (
            f"mask prompts of {tuple(prompts.masks.shape[-2:])} px for {self.patch} px slices"
        )
        if self.contract is not None:
            s = self.input_size / self.patch
            sparse, dense = self.embed_prompts(self._to_input_frame(prompts, s, s, (self.patch, self.patch)))
        else:
            sparse, dense = self.embed_prompts(prompts)
        masks, _ = self.decode(
            embedding, rows // b, sparse.to(embedding.dtype), dense.to(embedding.dtype), all_masks=all_masks
        )
        return masks.reshape(b, rows // b, *masks.shape[1:])

    def embed_prompts(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's sparse (R, T, C) and dense (R, C, g, g) prompt embeddings of R rows.

        Input contract: prompts in the input frame (:meth:`_to_input_frame`); ``options.prompt_tokens`` "sam" encodes
        exactly SAM's tokens (all rows must then have the same number of points and the same box use), "padded"
        pads as below. Before the contract: points and box corners are pixel centres of the P x P slice, mapped to the
        SAM input frame; rows without a box get two padding tokens in its place. Rows without a mask prompt get SAM's
        no-mask embedding. Mask prompts are binary (0/1), not logits, as RadSAM trains them.
        """
        encoder = self.sam.prompt_encoder
        if self.contract is not None and self.options.prompt_tokens == "sam":
            return self._sam_tokens(prompts)
        if self.contract is not None:
            points, boxes = prompts.points, prompts.boxes
        else:
            scale = self.input_size / self.patch
            points = (prompts.points + 0.5) * scale - 0.5  # SAM adds 0.5 again
            boxes = (prompts.boxes + 0.5) * scale - 0.5
        sparse, dense = encoder(points=(points, prompts.labels), boxes=None, masks=None)
        corners = encoder._embed_boxes(boxes)  # (R, 2, C)
        padding = encoder.not_a_point_embed.weight.expand_as(corners)
        sparse = torch.cat([sparse, torch.where(prompts.has_box[:, None, None], corners, padding)], 1)
        dense = dense.expand(prompts.rows, -1, -1, -1)
        if _any_set(prompts.has_mask):
            masks = F.interpolate(prompts.masks[:, None].float(), size=encoder.mask_input_size, mode="bilinear")
            dense = torch.where(prompts.has_mask[:, None, None, None], encoder._embed_masks(masks), dense)
        return sparse, dense

    def _sam_tokens(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's own prompt encoding of R rows that share their point count and box use (input frame)."""
        valid = prompts.labels >= 0
        counts, with_box = valid.sum(1), prompts.has_box
        if not (bool((counts == counts[0]).all()) and bool((with_box == with_box[0]).all())):
            raise ValueError("prompt_tokens 'sam' needs rows with the same number of points and the same box use")
        order = torch.argsort((~valid).int(), dim=1, stable=True)[:, : int(counts[0])]  # the valid points, in order
        points = torch.gather(prompts.points, 1, order[..., None].expand(-1, -1, 2))
        labels = torch.gather(prompts.labels, 1, order)
        encoder = self.sam.prompt_encoder
        sparse, dense = encoder(
            points=(points, labels) if int(counts[0]) else None,
            boxes=prompts.boxes if bool(with_box[0]) else None,
            masks=None,
        )
        if sparse.shape[1] == 0:
            raise ValueError("a prompt row without points, box or mask: nothing to segment")
        dense = dense.expand(prompts.rows, -1, -1, -1)
        if _any_set(prompts.has_mask):
            masks = F.interpolate(prompts.masks[:, None].float(), size=encoder.mask_input_size, mode="bilinear")
            dense = torch.where(prompts.has_mask[:, None, None, None], encoder._embed_masks(masks), dense)
        return sparse, dense


def _any_set(flags: torch.Tensor) -> bool:
    """``flags.any()`` as a bool; True on tensors without values (meta, or fake in the benchmark's memory traces):
    the path with mask prompts, which every correction round of a training step takes."""
    return True if flags.is_meta else guard_or_true(flags.any().item())
