"""Running SAM's frozen encoder and mask decoder with trainable additions injected into each block.

The stock SAM modules stay untouched (and hold all pretrained weights); the classes here hold only the
additions (adapters, depth embeddings) and a forward that threads tokens through the stock sub-layers with
the additions in place. Depth-aware additions always see the unpartitioned token grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling import MaskDecoder
from segment_anything.modeling.transformer import TwoWayAttentionBlock
from torch import nn

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, AttentionImpl, check_attention
from nnunet_sam.backbones.encoder import blockwise, run_block
from nnunet_sam.blocks.adapters import Adapter, AdapterKind
from nnunet_sam.blocks.checkpointing import run_block_unit
from nnunet_sam.blocks.depth import DepthPositionalEmbedding


class _NoAdapter(nn.Module):
    """Stands in for an absent adapter: identity after a layer, zero in parallel to it."""

    def __init__(self, skip: bool) -> None:
        super().__init__()
        self.skip = skip

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        return x if self.skip else torch.zeros_like(x)


def adapter(dim: int, kind: AdapterKind | None, depth: int, skip: bool = True) -> nn.Module:
    """One adapter; kind None leaves SAM's layer unchanged (ablations without adapters)."""
    return Adapter(dim, kind, depth, skip=skip) if kind is not None else _NoAdapter(skip)


def adapter_list(dim: int, kind: AdapterKind | None, depth: int, n: int, skip: bool = True) -> nn.ModuleList:
    """n adapters of one kind for blocks of one width."""
    return nn.ModuleList(adapter(dim, kind, depth, skip) for _ in range(n))


class EncoderAdditions(nn.Module):
    """Adapters (one after attention, one parallel to the MLP, per token block) and a depth embedding.

    Works on any backbone through its blockwise view (:mod:`nnunet_sam.backbones.encoder`): ``forward(encoder,
    x)`` runs the given image encoder on x (V * depth, 3, H, W) and returns the neck embedding
    (V * depth, prompt_dim, g, g) and the token maps after the blocks in ``feature_indices``, each
    (V * depth, g, g, block width) at the embedding grid g. ``block_dims`` gives the width of every block (one int:
    ``num_blocks`` blocks of that width, as in a ViT); the depth embedding is added to the stem's tokens.
    ``attention`` names the blocks' attention implementation (:mod:`nnunet_sam.backbones.attention`); blocks are
    checkpointed if ``gradient_checkpointing`` or :func:`~nnunet_sam.blocks.checkpointing.block_checkpointing`.
    """

    def __init__(
        self,
        block_dims: int | Sequence[int],
        num_blocks: int,
        depth: int,
        kind: AdapterKind | None = "dconv",
        depth_embedding: bool = True,
        feature_indices: tuple[int, ...] = (),
        gradient_checkpointing: bool = False,
        attention: AttentionImpl = DEFAULT_ATTENTION,
    ) -> None:
        super().__init__()
        self.attention = check_attention(attention)
        dims = [block_dims] * num_blocks if isinstance(block_dims, int) else [int(d) for d in block_dims]
        assert len(dims) == num_blocks, f"{len(dims)} block widths for {num_blocks} blocks"
        assert all(0 <= i < num_blocks for i in feature_indices), f"feature blocks {feature_indices} out of range"
        self.depth = depth
        self.feature_indices = tuple(feature_indices)
        self.gradient_checkpointing = gradient_checkpointing
        self.depth_embedding = DepthPositionalEmbedding(depth, dims[0]) if depth_embedding else None
        self.attn_adapters = nn.ModuleList(adapter(d, kind, depth, skip=True) for d in dims)
        self.mlp_adapters = nn.ModuleList(adapter(d, kind, depth, skip=False) for d in dims)

    def _block(self, i: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Token block i with its adapters, on the unpartitioned (V * depth, h, w, C) grid."""
        return run_block(
            block,
            x,
            lambda h: self.attn_adapters[i](h, self.depth),
            lambda h: self.mlp_adapters[i](h, self.depth),
            self.attention,
        )

    def forward(self, encoder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        assert x.shape[0] % self.depth == 0, f"{x.shape[0]} slices is not a multiple of depth {self.depth}"
        view = blockwise(encoder)
        assert len(view.blocks) == len(self.attn_adapters), (
            f"encoder has {len(view.blocks)} token blocks, the additions were built for {len(self.attn_adapters)}"
        )
        x = view.stem(x)  # (S, h, w, C)
        if self.depth_embedding is not None:
            x = self.depth_embedding(x)
        features = []
        for i, block in enumerate(view.blocks):
            x = view.enter_block(i, x)
            x = run_block_unit(self._block, i, block, x, always=self.gradient_checkpointing)
            if i in self.feature_indices:
                features.append(x)
        embedding = view.neck(x)
        grid = tuple(embedding.shape[-2:])
        assert all(tuple(f.shape[1:3]) == grid for f in features), (
            f"block features {[tuple(f.shape[1:3]) for f in features]} are not on the embedding grid {grid}"
        )
        return embedding, features


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
