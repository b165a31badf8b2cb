"""RadSAM: SAM as a 2D promptable model for slices (point, box, mask and correction-point prompts).

Composition only: the shared SAM core (:class:`~nnunet_sam.blocks.folded_sam.FoldedSAM`) on 2D patches without
adapters or depth embeddings (RadSAM keeps SAM's architecture and trains SAM itself), an input stem that windows
the intensities (:class:`IntensityWindow`), copies the slice into SAM's three channels (``PlainStem``) and applies
SAM's pixel normalisation, SAM's prompt encoder and SAM's mask decoder (primary mask output at prediction; with
``options.multimask_training`` the simulated-interaction forward of training returns all four of SAM's masks for
the paper's oracle loss). One decoder row per prompt; K prompts per slice are decoded in one batched call.

Intensities (:func:`intensity_windows`): a CT channel is clipped to [-500, 1000] HU and scaled to [0, 1], as in
the paper. nnU-Net stores CT channels z-scored with the dataset's foreground statistics (``CTNormalization``), so
HU = x * std + mean is recovered first; HU values outside nnU-Net's own clipping range (the foreground's 0.5 and
99.5 percentiles) are already clipped by nnU-Net. Other channels keep nnU-Net's normalisation (z-scores), mapped
linearly from [-3, 3] to [0, 1] and clipped. The [0, 1] image is then multiplied by 255 and normalised with SAM's
pixel mean and standard deviation, SAM's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from nnunet_sam.blocks.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.blocks.folded_sam import FoldedSAM
from nnunet_sam.prompting.radsam_prompts import Prompts, SimulatedInteraction

CT_WINDOW_HU = (-500.0, 1000.0)
ZSCORE_WINDOW = (-3.0, 3.0)


@dataclass(frozen=True)
class RadSAMOptions:
    """Network options (class attribute ``options`` of a RadSAM trainer, saved in the model's record).

    ``ct_window_hu``: CT intensities are clipped to this window and scaled to [0, 1] (the paper's [-500, 1000] HU).
    ``multimask_training``: in the simulated-interaction (training) forward, decode all four of SAM's masks, so
    that the loss is the primary mask's plus the best of the three others (the paper); predictions always use the
    primary mask, so this changes training only. Models saved before it existed trained the primary mask alone.
    """

    ct_window_hu: tuple[float, float] = CT_WINDOW_HU
    multimask_training: bool = field(default=True, metadata={"legacy": False})


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
        if scheme != "CTNormalization" or jitter <= 0:
            continue
        moves = (torch.rand(count, 2, generator=generator) * 2 - 1) * jitter * width
        new_low, new_high = low + moves[:, 0], high + moves[:, 1]
        new_high = torch.maximum(new_high, new_low + 0.05 * width)  # never a reversed or empty window
        props = intensity_properties[str(m)]
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
    from nnU-Net's plans; CT channels use ``ct_window_hu`` (the paper's [-500, 1000] HU by default); see the module
    docstring for the rule.
    """
    windows = []
    for channel, scheme in enumerate(normalization_schemes):
        if scheme == "CTNormalization":
            props = intensity_properties[str(channel)]
            low, high = ct_window_hu
            windows.append((props["std"] / (high - low), (props["mean"] - low) / (high - low)))
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
        super().__init__(
            backbone,
            in_channels,
            patch_size,
            sam_input_size,
            encoder_adapter=None,
            decoder_token_adapter=None,
            decoder_image_adapter=None,
            depth_embedding=False,
            learned_stem=False,
            attention=attention,
        )
        self.options = options or RadSAMOptions()
        windows = intensity_windows(["ZScoreNormalization"] * in_channels, {})
        self.stem = nn.Sequential(
            IntensityWindow(windows), self.stem, PixelNormalisation(self.sam.pixel_mean, self.sam.pixel_std)
        )

    def set_intensity_windows(self, windows: Sequence[tuple[float, float]]) -> None:
        """Replace the per-channel (scale, shift) of the input window (see :func:`intensity_windows`)."""
        assert len(windows) == self.stem[0].scale.shape[1], f"{len(windows)} windows for a different channel count"
        self.stem[0] = IntensityWindow(windows).to(self.stem[0].scale.device)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, M, P, P) -> SAM image embeddings (B, C, g, g)."""
        return self.encode(x)[0]

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
        sparse, dense = self.embed_prompts(prompts)
        masks, _ = self.decode(
            embedding, rows // b, sparse.to(embedding.dtype), dense.to(embedding.dtype), all_masks=all_masks
        )
        return masks.reshape(b, rows // b, *masks.shape[1:])

    def embed_prompts(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's sparse (R, N + 3, C) and dense (R, C, g, g) prompt embeddings of R rows.

        Points and box corners are pixel centres of the P x P slice, mapped to the SAM input frame. Rows without a
        box get two padding tokens in its place; rows without a mask prompt get SAM's no-mask embedding. Mask
        prompts are binary (0/1), not logits, as RadSAM trains them.
        """
        encoder = self.sam.prompt_encoder
        scale = self.input_size / self.patch
        points = (prompts.points + 0.5) * scale - 0.5  # SAM adds 0.5 again
        sparse, dense = encoder(points=(points, prompts.labels), boxes=None, masks=None)
        corners = encoder._embed_boxes((prompts.boxes + 0.5) * scale - 0.5)  # (R, 2, C)
        padding = encoder.not_a_point_embed.weight.expand_as(corners)
        sparse = torch.cat([sparse, torch.where(prompts.has_box[:, None, None], corners, padding)], 1)
        dense = dense.expand(prompts.rows, -1, -1, -1)
        if _any_set(prompts.has_mask):
            masks = F.interpolate(prompts.masks[:, None].float(), size=encoder.mask_input_size, mode="bilinear")
            dense = torch.where(prompts.has_mask[:, None, None, None], encoder._embed_masks(masks), dense)
        return sparse, dense


def _any_set(flags: torch.Tensor) -> bool:
    """``flags.any()`` as a bool; True on tensors without values (meta, or fake in the benchmark's memory traces):
    the path with mask prompts, which every correction round of a training step takes."""
    return True if flags.is_meta else guard_or_true(flags.any().item())
