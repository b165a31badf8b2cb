"""SAM's attention with decomposed relative positions, computed without any N x N tensor.

segment-anything's ``Attention`` adds a relative-position bias to the logits of every query i and key j:
``bias[i, j] = rel_h[i, row(j)] + rel_w[i, col(j)]``, where ``rel_h[i]`` (H values) and ``rel_w[i]`` (W values) are
products of query i with the relative-position tables. It forms the (N, N) logits per head, adds the bias, and
keeps the softmax (and the bias) for backward: about 1.5 GiB per slice in each global block of ViT-B at 1024 px.

The bias is a dot product of a per-query vector with a per-key one-hot code,
``bias[i, j] = <[rel_h[i], rel_w[i]], [onehot(row(j)), onehot(col(j))]>``, so it folds into the query and the key::

    q' = [scale * q, rel_h, rel_w]      k' = [k, onehot(row), onehot(col)]      v' = [v, 0]

and ``softmax(q' k'^T) v'`` is one call of ``torch.nn.functional.scaled_dot_product_attention`` (scale 1, no mask).
That call picks a fused kernel (flash or memory-efficient attention on CUDA, flash on the CPU) which stores only
q', k', v', the output and one log-sum-exp per query for backward. The head width grows from d to d + H + W
(ViT-B global block at 1024 px: 64 -> 192, within the fused kernels' limits), rounded up to a multiple of 8.

Implementations, saved with each model (``attention`` in the plans' ``nnunet_sam`` block):

* ``"sam"``: segment-anything's own module forward (models trained before this option existed);
* ``"sdpa"``: the formulation above; the same function to float32 rounding (tested against segment-anything, forward
  and gradients), for windowed and global ViT blocks and for the volumetric encoder's 3D windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

AttentionImpl = Literal["sam", "sdpa"]
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("sam", "sdpa")
LEGACY_ATTENTION: AttentionImpl = "sam"  # what a saved model without an ``attention`` field was trained with
DEFAULT_ATTENTION: AttentionImpl = "sdpa"  # what new trainings use and record
MASKED = -1.0e4  # additive logit of a key a query must not see (exp underflows to exactly 0 in float32)


def check_attention(name: str) -> AttentionImpl:
    """Return ``name`` if it is a known implementation, else raise a ValueError naming the known ones."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown attention implementation '{name}'. Known: {', '.join(ATTENTION_IMPLEMENTATIONS)} "
            "(field 'attention' of the plans' nnunet_sam block)."
        )
    return name  # type: ignore[return-value]


def key_codes(grid: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One-hot coordinates of the keys of a token grid in raster order: (N, sum(grid)), N = prod(grid)."""
    coords = torch.meshgrid(*(torch.arange(n, device=device) for n in grid), indexing="ij")
    return torch.cat([F.one_hot(c.reshape(-1), n) for c, n in zip(coords, grid)], dim=-1).to(dtype)


def decomposed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: Sequence[torch.Tensor], grid: Sequence[int], scale: float
) -> torch.Tensor:
    """Attention with a bias that is a sum of per-axis terms, without forming any (N, N) tensor.

    q, k, v (..., N, d): tokens of a ``grid`` (n_1, ..., n_k) in raster order, queries and keys on the same grid.
    biases[a] (..., N, n_a): what each query adds to the logit of a key at coordinate c along axis a.
    Returns softmax(scale * q k^T + sum_a biases[a][..., coord_a(key)]) v, shape (..., N, d).
    """
    d = q.shape[-1]
    if not biases:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    extra = sum(grid)
    assert [b.shape[-1] for b in biases] == list(grid), f"bias widths {[b.shape[-1] for b in biases]} != grid {grid}"
    pad = -(d + extra) % 8  # fused kernels want head widths that are multiples of 8
    dtype = q.dtype
    codes = key_codes(grid, dtype, q.device)
    lead = k.shape[:-1]
    q2 = F.pad(torch.cat([q * scale, *(b.to(dtype) for b in biases)], dim=-1), (0, pad))
    k2 = F.pad(torch.cat([k, codes.expand(*lead, extra)], dim=-1), (0, pad))
    v2 = F.pad(v, (0, extra + pad))
    return F.scaled_dot_product_attention(q2, k2, v2.to(dtype), scale=1.0)[..., :d]


def sam_attention(attn: Attention, x: torch.Tensor, implementation: AttentionImpl = DEFAULT_ATTENTION) -> torch.Tensor:
    """segment-anything's ``Attention`` layer on tokens x (B, H, W, C) -> (B, H, W, C), by ``implementation``."""
    if implementation == "sam":
        return attn(x)
    b, h, w, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, N, d)
    biases: list[torch.Tensor] = []
    if attn.use_rel_pos:
        r_q = q.reshape(b, heads, h, w, -1)
        table_h = get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype)  # (h, h, d)
        table_w = get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype)
        biases = [
            torch.einsum("bnhwc,hkc->bnhwk", r_q, table_h).reshape(b, heads, h * w, h),
            torch.einsum("bnhwc,wkc->bnhwk", r_q, table_w).reshape(b, heads, h * w, w),
        ]
    out = decomposed_attention(q, k, v, biases, (h, w), attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(b, h, w, -1))
