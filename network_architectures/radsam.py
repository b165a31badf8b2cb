"""RadSAM: SAM as a 2D promptable model for slices (point, box, mask and correction-point prompts).

Composition only: the shared SAM core (:class:`~nnunet_sam.blocks.folded_sam.FoldedSAM`) on 2D patches without
adapters or depth embeddings (RadSAM keeps SAM's architecture and trains SAM itself), an input stem that windows
the intensities (:class:`IntensityWindow`), copies the slice into SAM's three channels (``PlainStem``) and applies
SAM's pixel normalisation, SAM's prompt encoder and SAM's mask decoder (primary mask output). One decoder row per
prompt; K prompts per slice are decoded in one batched call.

Intensities (:func:`intensity_windows`): a CT channel is clipped to [-500, 1000] HU and scaled to [0, 1], as in
the paper. nnU-Net stores CT channels z-scored with the dataset's foreground statistics (``CTNormalization``), so
HU = x * std + mean is recovered first; HU values outside nnU-Net's own clipping range (the foreground's 0.5 and
99.5 percentiles) are already clipped by nnU-Net. Other channels keep nnU-Net's normalisation (z-scores), mapped
linearly from [-3, 3] to [0, 1] and clipped. The [0, 1] image is then multiplied by 255 and normalised with SAM's
pixel mean and standard deviation, SAM's own preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sam.blocks.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.blocks.folded_sam import FoldedSAM
from nnunet_sam.losses import dice_loss
from nnunet_sam.prompting.radsam_prompts import MIN_LABEL_PIXELS, Prompts, SimulatedInteraction, structure_masks

CT_WINDOW_HU = (-500.0, 1000.0)
ZSCORE_WINDOW = (-3.0, 3.0)


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
    In training mode, a :class:`SimulatedInteraction` queued with :meth:`queue_interaction` replaces the prompts:
    ``forward(x)`` then returns (1 + rounds, B, K, P, P) logits, the initial prediction and one per correction
    round, all decoded from one image embedding.
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        patch_size: Sequence[int],
        sam_input_size: int,
        windows: Sequence[tuple[float, float]] | None = None,
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
        windows = windows if windows is not None else intensity_windows(["ZScoreNormalization"] * in_channels, {})
        assert len(windows) == in_channels, f"{len(windows)} intensity windows for {in_channels} channels"
        self.stem = nn.Sequential(
            IntensityWindow(windows), self.stem, PixelNormalisation(self.sam.pixel_mean, self.sam.pixel_std)
        )
        self._interaction: SimulatedInteraction | None = None

    def set_intensity_windows(self, windows: Sequence[tuple[float, float]]) -> None:
        """Replace the per-channel (scale, shift) of the input window (see :func:`intensity_windows`)."""
        assert len(windows) == self.stem[0].scale.shape[1], f"{len(windows)} windows for a different channel count"
        self.stem[0] = IntensityWindow(windows).to(self.stem[0].scale.device)

    def queue_interaction(self, interaction: SimulatedInteraction) -> None:
        """Prompts of the next training forward (reference rows ordered (slice, structure))."""
        self._interaction = interaction

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Slices (B, M, P, P) -> SAM image embeddings (B, C, g, g)."""
        return self.encode(x)[0]

    def forward(self, x: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        embedding = self.embed(x)
        if self._interaction is not None:
            interaction, self._interaction = self._interaction, None
            logits = [self.decode_prompts(embedding, interaction.initial())]
            for _ in range(interaction.rounds):
                logits.append(self.decode_prompts(embedding, interaction.correct(logits[-1].flatten(0, 1))))
            return torch.stack(logits)
        if prompts is None:
            raise ValueError(
                "RadSAM segments what a prompt points at and has no prompt-free output: use nnunet_sam.radsam "
                "(segment_from_prompt, nnunet_sam_radsam) or nnunet_sam_radsam_benchmark instead of nnUNetv2_predict."
            )
        return self.decode_prompts(embedding, prompts)

    def decode_prompts(self, embedding: torch.Tensor, prompts: Prompts) -> torch.Tensor:
        """Embeddings (B, C, g, g) and prompts of R = B * K rows -> mask logits (B, K, P, P)."""
        b, rows = embedding.shape[0], prompts.rows
        assert rows % b == 0, f"{rows} prompt rows for {b} slices: need the same number K of prompts per slice"
        assert prompts.masks.shape[-2:] == (self.patch, self.patch), (
            f"mask prompts of {tuple(prompts.masks.shape[-2:])} px for {self.patch} px slices"
        )
        sparse, dense = self.embed_prompts(prompts)
        masks, _ = self.decode(embedding, rows // b, sparse.to(embedding.dtype), dense.to(embedding.dtype))
        return masks.reshape(b, rows // b, self.patch, self.patch)

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
        if prompts.has_mask.any():
            masks = F.interpolate(prompts.masks[:, None].float(), size=encoder.mask_input_size, mode="bilinear")
            dense = torch.where(prompts.has_mask[:, None, None, None], encoder._embed_masks(masks), dense)
        return sparse, dense


class RadSAMLoss(nn.Module):
    """Dice + BCE of mask logits (S, B, K, P, P) (S rounds; or (B, K, P, P)) against the target (B, 1, P, P).

    Row k of a slice is label k + 1 of the target (K = 1: a binary target); a (slice, label) pair with fewer than
    ``min_pixels`` label pixels is no sample and is left out. Averaged over rounds and samples; 0 (with gradient)
    when a batch has none.
    """

    def __init__(self, min_pixels: int = MIN_LABEL_PIXELS) -> None:
        super().__init__()
        self.min_pixels = min_pixels

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits if logits.dim() == 5 else logits[None]
        reference = structure_masks(target, logits.shape[2] + 1)  # (B, K, P, P)
        assert logits.shape[1:] == reference.shape, f"logits {tuple(logits.shape)} vs target {tuple(target.shape)}"
        valid = reference.flatten(2).sum(2) >= self.min_pixels  # (B, K)
        if not valid.any():
            return logits.sum() * 0
        chosen = logits[:, valid].float().flatten(2)  # (S, V, P * P)
        ref = reference[valid].float().flatten(1).expand_as(chosen)
        bce = F.binary_cross_entropy_with_logits(chosen, ref, reduction="none").mean(-1)
        return (dice_loss(chosen, ref) + bce).mean()
