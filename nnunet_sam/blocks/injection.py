"""Running SAM's frozen encoder and mask decoder with trainable additions injected into each block.

The stock SAM modules stay untouched (and hold all pretrained weights); the classes here hold only the
additions (adapters, depth embeddings) and a forward that threads tokens through the stock sub-layers with
the additions in place. Depth-aware additions always see the unpartitioned token grid.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from segment_anything.modeling.transformer import TwoWayAttentionBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunet_sam.blocks.adapters import Adapter, AdapterKind
from nnunet_sam.blocks.depth import DepthPositionalEmbedding


class _NoAdapter(nn.Module):
    """Stands in for an absent adapter: identity after a layer, zero in parallel to it."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        return x if self.skip else torch.zeros_like(x)


def adapter_list(dim: int, kind: AdapterKind | None, depth: int, n: int, skip: bool = True) -> nn.ModuleList:
    """n adapters of one kind; kind None leaves SAM's layers unchanged (ablations without adapters)."""
    return nn.ModuleList(
        Adapter(dim, kind, depth, skip=skip) if kind is not None else _NoAdapter(skip) for _ in range(n)
    )


class EncoderAdditions(nn.Module):
    """Adapters (one after attention, one parallel to the MLP, per block) and a depth embedding for a ViT.

    ``forward(encoder, x, depth)`` runs the given stock ``ImageEncoderViT`` on x (V * depth, 3, H, W) and
    returns the neck embedding (V * depth, prompt_dim, H / p, W / p) and the token maps after the blocks in
    ``feature_indices``, each (V * depth, H / p, W / p, embed_dim).
    """

    def __init__(
        self,
        embed_dim: int,
        num_blocks: int,
        depth: int,
        kind: AdapterKind | None = "dconv",
        depth_embedding: bool = True,
        feature_indices: tuple[int, ...] = (),
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.feature_indices = tuple(feature_indices)
        self.gradient_checkpointing = gradient_checkpointing
        self.depth_embedding = DepthPositionalEmbedding(depth, embed_dim) if depth_embedding else None
        self.attn_adapters = adapter_list(embed_dim, kind, depth, num_blocks, skip=True)
        self.mlp_adapters = adapter_list(embed_dim, kind, depth, num_blocks, skip=False)

    def _block(self, i: int, block: Block, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        h = block.norm1(x)
        if block.window_size > 0:
            height, width = h.shape[1], h.shape[2]
            h, pad_hw = window_partition(h, block.window_size)
        h = block.attn(h)
        if block.window_size > 0:
            h = window_unpartition(h, block.window_size, pad_hw, (height, width))
        x = shortcut + self.attn_adapters[i](h, self.depth)  # back on the (V * depth, h, w, C) grid
        h = block.norm2(x)
        return x + block.mlp(h) + self.mlp_adapters[i](h, self.depth)

    def forward(self, encoder: ImageEncoderViT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        assert x.shape[0] % self.depth == 0, f"{x.shape[0]} slices is not a multiple of depth {self.depth}"
        x = encoder.patch_embed(x)  # (S, h, w, C)
        if encoder.pos_embed is not None:
            assert encoder.pos_embed.shape[1:3] == x.shape[1:3], (
                f"pos_embed grid {tuple(encoder.pos_embed.shape[1:3])} != token grid {tuple(x.shape[1:3])}"
            )
            x = x + encoder.pos_embed
        if self.depth_embedding is not None:
            x = self.depth_embedding(x)
        features = []
        for i, block in enumerate(encoder.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(self._block, i, block, x, use_reentrant=False)
            else:
                x = self._block(i, block, x)
            if i in self.feature_indices:
                features.append(x)
        return encoder.neck(x.permute(0, 3, 1, 2)), features


class DecoderAdditions(nn.Module):
    """Adapters for SAM's two-way transformer and a depth embedding for the image positional encoding.

    Per two-way block: ``token_kind`` adapters after token self-attention, after token->image
    cross-attention and parallel to the token MLP; an ``image_kind`` adapter after image->token
    cross-attention. Decoder batch rows are (V, depth) with the slice index fastest.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        depth: int,
        token_kind: AdapterKind | None = "dmlp",
        image_kind: AdapterKind | None = "dconv",
        depth_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.depth_embedding = DepthPositionalEmbedding(depth, dim) if depth_embedding else None

        self.self_attn = adapter_list(dim, token_kind, depth, num_blocks)
        self.token_to_image = adapter_list(dim, token_kind, depth, num_blocks)
        self.mlp = adapter_list(dim, token_kind, depth, num_blocks, skip=False)
        self.image_to_token = adapter_list(dim, image_kind, depth, num_blocks)

    def image_pe(self, pe: torch.Tensor, rows: int) -> torch.Tensor:
        """SAM's dense PE (1, C, h, w) -> per-row PE (rows, C, h, w) with the slice's depth embedding added."""
        pe = pe.expand(rows, -1, -1, -1)
        if self.depth_embedding is None:
            return pe
        return self.depth_embedding(pe.contiguous(), channels_last=False)

    def _block(
        self, i: int, block: TwoWayAttentionBlock, queries, keys, query_pe, key_pe, grid: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.depth
        if block.skip_first_layer_pe:
            queries = self.self_attn[i](block.self_attn(q=queries, k=queries, v=queries), d)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn[i](block.self_attn(q=q, k=q, v=queries), d)
        queries = block.norm1(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = block.norm2(queries + self.token_to_image[i](block.cross_attn_token_to_image(q=q, k=k, v=keys), d))

        queries = block.norm3(queries + block.mlp(queries) + self.mlp[i](queries, d))

        q, k = queries + query_pe, keys + key_pe
        attn = block.cross_attn_image_to_token(q=k, k=q, v=queries)  # (R, h * w, C)
        attn = self.image_to_token[i](attn.view(attn.shape[0], *grid, -1), d).flatten(1, 2)
        keys = block.norm4(keys + attn)
        return queries, keys

    def forward(
        self, decoder: MaskDecoder, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the two-way transformer and SAM's first (single-mask) output head.

        image: (R, C, h, w) image embedding + dense prompt; image_pe: (R, C, h, w); tokens: (R, T, C) with the
        mask tokens at positions ``mask_token_index .. +4``. Returns the transformed tokens (R, T, C) and the
        upscaled mask features (R, C / 8, 4h, 4w) for the caller's hypernetwork products.
        """
        rows, c, h, w = image.shape
        assert rows % self.depth == 0, f"decoder rows {rows} not a multiple of depth {self.depth}"
        transformer = decoder.transformer
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for i, block in enumerate(transformer.layers):
            queries, keys = self._block(i, block, queries, keys, tokens, key_pe, (h, w))
        attn = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        queries = transformer.norm_final_attn(queries + attn)
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(rows, c, h, w))
        return queries, upscaled
