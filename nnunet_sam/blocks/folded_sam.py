"""Frozen SAM on folded-depth patches with trainable additions: the part every method shares.

A patch (B, M, D, P, P) is folded into B * D slices, mapped to 3 channels at the SAM input size by a stem,
and encoded by SAM's image encoder with :class:`EncoderAdditions`. Methods prompt SAM's decoder with K
prompts per slice; the decoder runs once on all B * K * D rows, ordered (volume, prompt, slice) with the slice
fastest so that depth adapters see neighbouring slices of one volume and prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from torch import nn

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.blocks.adapters import AdapterKind
from nnunet_sam.blocks.injection import DecoderAdditions, EncoderAdditions
from nnunet_sam.blocks.stem import ModalityStem, PlainStem


@dataclass(frozen=True)
class SAMAdditions:
    """What a method adds around the frozen SAM: adapter kinds in the encoder blocks and on the decoder's tokens and
    image (None: none), depth embeddings, a learned stem (else SAM's own intensity normalisation), and activation
    checkpointing of the encoder blocks. The defaults are SAM as published (:data:`STOCK_SAM`)."""

    encoder_adapter: AdapterKind | None = None
    decoder_token_adapter: AdapterKind | None = None
    decoder_image_adapter: AdapterKind | None = None
    depth_embedding: bool = False
    learned_stem: bool = False
    gradient_checkpointing: bool = False


STOCK_SAM = SAMAdditions()  # SAM's encoder and decoder unchanged (PanSAM, RadSAM)


class FoldedSAM(nn.Module):
    """SAM (frozen, under ``self.sam``), a stem, and adapters/depth embeddings for encoder and decoder, as
    ``additions`` say."""

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        patch_size: Sequence[int],
        sam_input_size: int,
        additions: SAMAdditions = STOCK_SAM,
        attention: AttentionImpl = DEFAULT_ATTENTION,
    ) -> None:
        super().__init__()
        assert len(patch_size) in (2, 3), f"patch must be [P, P] or [D, P, P], got {tuple(patch_size)}"
        assert patch_size[-1] == patch_size[-2], f"in-plane patch must be square, got {tuple(patch_size)}"
        self.spec = get_backbone(backbone)
        self.is_2d = len(patch_size) == 2
        self.depth = 1 if self.is_2d else int(patch_size[0])
        self.patch = int(patch_size[-1])
        self.input_size = sam_input_size

        self.sam = build_sam(self.spec, sam_input_size)
        self.sam.requires_grad_(False)
        self.stem = (
            ModalityStem(in_channels, self.patch, sam_input_size)
            if additions.learned_stem
            else PlainStem(self.patch, sam_input_size)
        )
        self.encoder_additions = EncoderAdditions(
            self.spec.block_dims,
            len(self.spec.block_dims),
            self.depth,
            kind=additions.encoder_adapter,
            depth_embedding=additions.depth_embedding,
            feature_indices=self.spec.feature_indices,
            gradient_checkpointing=additions.gradient_checkpointing,
            attention=attention,
        )
        self.decoder_additions = DecoderAdditions(
            self.spec.prompt_dim,
            len(self.sam.mask_decoder.transformer.layers),
            self.depth,
            token_kind=additions.decoder_token_adapter,
            image_kind=additions.decoder_image_adapter,
            depth_embedding=additions.depth_embedding,
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x (B, M, D, P, P) or 2d (B, M, P, P) -> SAM embedding (B * D, C, g, g) and block features."""
        if x.dim() == 4:
            assert self.is_2d, f"this network was built for 3D patches, got a 2D input {tuple(x.shape)}"
            x = x[:, :, None]
        b, _, d, h, w = x.shape
        assert (d, h, w) == (self.depth, self.patch, self.patch), (
            f"input patch {(d, h, w)} != network patch {(self.depth, self.patch, self.patch)}"
        )
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, -1, h, w)
        return self.encoder_additions(self.sam.image_encoder, self.stem(slices))

    def to_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Per-slice prompt data (B * D, K, ...) -> decoder rows (B * K * D, ...)."""
        d, k = self.depth, t.shape[1]
        return t.reshape(-1, d, k, *t.shape[2:]).transpose(1, 2).reshape(-1, *t.shape[2:])

    def from_rows(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """Decoder rows (B * K * D, ...) -> (B, D, K, ...)."""
        return t.reshape(-1, k, self.depth, *t.shape[1:]).transpose(1, 2)

    def decode(
        self,
        embedding: torch.Tensor,
        k: int,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        prefix_tokens: torch.Tensor | None = None,
        decoder: MaskDecoder | None = None,
        dense_pe: torch.Tensor | None = None,
        all_masks: bool = False,
        size: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched pass of SAM's mask decoder over all rows; SAM's single-mask output head.

        embedding (B * D, C, g, g); sparse (R, T, C) and dense (R or 1, C, g, g) prompt embeddings of the
        R = B * K * D rows; prefix_tokens (R, T0, C) go before SAM's output tokens. ``decoder`` and its prompt
        encoder's ``dense_pe`` (1, C, g, g) default to SAM's own (a method with a second decoder passes its own).
        Returns mask logits (R, P, P) at patch resolution (``size``: at size x size instead) and the transformed
        tokens (R, T0 + 5 + T, C); with ``all_masks`` the logits of all of SAM's mask tokens (R, 4, P, P), the
        single-mask output first.
        """
        c, g = embedding.shape[1], embedding.shape[-1]
        rows = dense.shape[0]
        b = embedding.shape[0] // self.depth
        assert rows == b * k * self.depth, f"{rows} decoder rows != {b} x {k} prompts x {self.depth} slices"
        image = embedding.reshape(b, 1, self.depth, c, g, g).expand(b, k, self.depth, c, g, g)
        image = image.reshape(rows, c, g, g) + dense.to(embedding.dtype)
        dense_pe = self.sam.prompt_encoder.get_dense_pe() if dense_pe is None else dense_pe
        image_pe = self.decoder_additions.image_pe(dense_pe, rows)
        decoder = self.sam.mask_decoder if decoder is None else decoder
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = [output_tokens.expand(rows, -1, -1).to(sparse.dtype), sparse]
        offset = 0 if prefix_tokens is None else prefix_tokens.shape[1]
        if prefix_tokens is not None:
            tokens.insert(0, prefix_tokens.to(sparse.dtype))
        tokens_out, upscaled = self.decoder_additions(decoder, image, image_pe, torch.cat(tokens, dim=1))
        count = decoder.num_mask_tokens if all_masks else 1  # the first mask token is SAM's single-mask output
        hyper = torch.stack(
            [decoder.output_hypernetworks_mlps[i](tokens_out[:, offset + 1 + i]) for i in range(count)], 1
        )
        masks = (hyper @ upscaled.flatten(2)).view(rows, count, *upscaled.shape[-2:])
        size = size or self.patch
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        return (masks if all_masks else masks[:, 0]), tokens_out
