"""SAM's frozen ViT turned into a volumetric encoder on a 3D token grid (3DSAM-adapter).

A volume of D slices is embedded slice by slice with SAM's frozen patch embedding; a learnable depth-wise
convolution then merges every ``slice_group`` consecutive slices into one token, so the ViT sees a token grid
(T, g, g) with T = D / slice_group. Positions: SAM's 2D ``pos_embed`` (resized to the in-plane grid when the
checkpoint is loaded, :func:`~nnunet_sam.backbones.checkpoints.resize_to_input`) plus a learnable depth
embedding (zero at initialisation). Every block attends within cubic 3D windows of ``window`` tokens per axis
(an axis shorter than the window is one window); odd blocks shift the windows by half a window, Swin-style,
along every axis with more than one window. Relative positions: SAM's h and w tables resized (linearly) to the
window, and a depth table = mean of the resized h and w tables + a learnable offset (zero at initialisation,
so the depth table starts as their mean whatever weights are loaded later). Each block starts with a
DConv adapter (:mod:`nnunet_sam.blocks.adapters`, bottleneck with a depth-wise 3D conv, up-projection zero), or
the registered kind ``adapter_kind`` (depth = the depth tokens T), or one of :data:`BLOCK_ADAPTERS` (adapters of
other methods, each in the place its method puts it: ST-Adapter before the block, Med-Adapter after it, the
Med-Adapters of the last block of each quarter of the blocks linked stage to stage).
``attention`` picks how window attention is computed (:mod:`nnunet_sam.backbones.attention`): ``"sam"`` forms the
(N, N) bias and Swin mask of every window; ``"sdpa"`` folds the per-axis relative positions and the per-axis
shift masks into the query and key, with no (N, N) tensor. Blocks follow
:func:`~nnunet_sam.blocks.checkpointing.block_checkpointing`.

Like :class:`~nnunet_sam.blocks.injection.EncoderAdditions` this module holds only the additions and is given
the stock ``ImageEncoderViT`` at every call; all of SAM's weights stay in the stock module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention, Block
from torch import nn

from nnunet_sam.backbones.attention import (
    DEFAULT_ATTENTION,
    MASKED,
    AttentionImpl,
    check_attention,
    decomposed_attention,
)
from nnunet_sam.blocks.adapters import Adapter, AdapterKind
from nnunet_sam.blocks.checkpointing import run_block_unit
from nnunet_sam.blocks.med_adapter import MedAdapter
from nnunet_sam.blocks.st_adapter import STAdapter

Grid = tuple[int, int, int]

# Adapter names of other methods (beside the Adapter kinds) -> where in a block the adapter runs.
BLOCK_ADAPTERS: dict[str, str] = {"st_adapter": "before", "med_adapter": "after"}


def window_dims(grid: Grid, window: int) -> Grid:
    """Window extent per axis: ``window`` tokens, or the whole axis where it is shorter (one window)."""
    dims = tuple(min(window, n) for n in grid)
    for n, w in zip(grid, dims):
        assert n % w == 0, f"token grid {grid} is not a whole number of {window}-token windows along every axis"
    return dims  # type: ignore[return-value]


def window_partition_3d(x: torch.Tensor, dims: Grid) -> torch.Tensor:
    """(B, T, H, W, C) -> (B * nW, wd * wh * ww, C), windows in (t, h, w) raster order per volume."""
    b, t, h, w, c = x.shape
    wd, wh, ww = dims
    x = x.view(b, t // wd, wd, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wd * wh * ww, c)


def window_unpartition_3d(windows: torch.Tensor, dims: Grid, grid: Grid) -> torch.Tensor:
    """Inverse of :func:`window_partition_3d`: (B * nW, N, C) -> (B, T, H, W, C)."""
    t, h, w = grid
    wd, wh, ww = dims
    c = windows.shape[-1]
    x = windows.view(-1, t // wd, h // wh, w // ww, wd, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, t, h, w, c)


def shifted_window_mask(grid: Grid, dims: Grid, shift: Grid) -> torch.Tensor:
    """Additive attention mask (nW, N, N) for windows of the grid rolled by ``-shift``: -inf between tokens that
    were not neighbours before the roll (they come from different regions of the cyclically shifted grid)."""
    region = torch.zeros(1, *grid, 1)
    count = 0
    ranges = [(slice(0, -w), slice(-w, -s), slice(-s, None)) if s > 0 else (slice(None),) for w, s in zip(dims, shift)]
    for rt in ranges[0]:
        for rh in ranges[1]:
            for rw in ranges[2]:
                region[:, rt, rh, rw] = count
                count += 1
    ids = window_partition_3d(region, dims)[..., 0]  # (nW, N)
    mask = torch.zeros(ids.shape[0], ids.shape[1], ids.shape[1])
    return mask.masked_fill(ids[:, :, None] != ids[:, None, :], float("-inf"))


def shifted_window_axis_masks(grid: Grid, dims: Grid, shift: Grid) -> list[torch.Tensor | None]:
    """The mask of :func:`shifted_window_mask` as one additive term per axis, for queries against key coordinates.

    Two tokens of a window were neighbours before the roll exactly when they lie in the same region along every
    axis, so the mask is a sum of per-axis terms: entry a (nW, N, wd_a) is 0 where the key coordinate along axis a
    is in the query's region along a and ``MASKED`` elsewhere (None for an axis without shift). Added to the
    per-axis relative-position terms, it needs no (N, N) tensor (:mod:`nnunet_sam.backbones.attention`).
    """
    windows = [n // w for n, w in zip(grid, dims)]
    masks: list[torch.Tensor | None] = []
    for axis, (n, w, s) in enumerate(zip(grid, dims, shift)):
        if s == 0:
            masks.append(None)
            continue
        region = torch.zeros(n, dtype=torch.long)
        region[n - w : n - s] = 1
        region[n - s :] = 2
        local = region.view(n // w, w)  # (windows along a, w): region of each coordinate of each window
        mask = torch.where(local[:, :, None] != local[:, None, :], MASKED, 0.0)  # (windows, q coord, k coord)
        shape = [1] * 6 + [w]
        shape[axis] = windows[axis]
        shape[3 + axis] = w
        full = mask.view(shape).expand(*windows, *dims, w)  # (nWd, nWh, nWw, wd, wh, ww, k coord)
        masks.append(full.reshape(-1, dims[0] * dims[1] * dims[2], w).contiguous())
    return masks


def resize_rel_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resize of a relative-position table (L, C) -> (length, C), as segment-anything's get_rel_pos."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.T[None], size=length, mode="linear")[0].T


def index_rel_table(table: torch.Tensor, n: int) -> torch.Tensor:
    """Entries (n, n, C) of a table (2w - 1, C) for query/key offsets within n <= w tokens (centre = offset 0)."""
    centre = (table.shape[0] - 1) // 2
    offsets = torch.arange(n, device=table.device)[:, None] - torch.arange(n, device=table.device)[None, :]
    return table[offsets + centre]


def window_attention_3d(
    attn: Attention,
    x: torch.Tensor,
    dims: Grid,
    tables: tuple[torch.Tensor, ...],
    mask: torch.Tensor | None,
    axis_masks: list[torch.Tensor | None] | None = None,
    implementation: AttentionImpl = "sam",
) -> torch.Tensor:
    """SAM's Attention layer on 3D windows with decomposed 3D relative positions.

    x (B * nW, N, C) with N = wd * wh * ww; tables: depth, height, width tables, each (2 * window - 1, head_dim).
    ``"sam"``: mask (nW, N, N) additive or None, the bias formed as an (N, N) matrix; ``"sdpa"``: axis_masks
    (:func:`shifted_window_axis_masks`) or None, no (N, N) tensor (:func:`decomposed_attention`).
    Returns (B * nW, N, C).
    """
    bw, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(bw, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B * nW, heads, N, head_dim)
    wd, wh, ww = dims
    r_q = q.reshape(bw, heads, wd, wh, ww, -1)
    rd, rh, rw = (index_rel_table(t, m).to(q.dtype) for t, m in zip(tables, dims))
    rel_d = torch.einsum("bndhwc,dkc->bndhwk", r_q, rd)
    rel_h = torch.einsum("bndhwc,hkc->bndhwk", r_q, rh)
    rel_w = torch.einsum("bndhwc,wkc->bndhwk", r_q, rw)
    if implementation == "sdpa":
        biases = [r.reshape(bw, heads, n, m) for r, m in zip((rel_d, rel_h, rel_w), dims)]
        for a, axis_mask in enumerate(axis_masks or ()):
            if axis_mask is not None:
                num_windows = axis_mask.shape[0]
                masked = biases[a].view(bw // num_windows, num_windows, heads, n, -1) + axis_mask[None, :, None]
                biases[a] = masked.view(bw, heads, n, -1)
        out = decomposed_attention(q, k, v, biases, dims, attn.scale)
        return attn.proj(out.transpose(1, 2).reshape(bw, n, c))
    bias = (
        rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
    )  # (B * nW, heads, wd, wh, ww, kd, kh, kw)
    bias = bias.reshape(bw, heads, n, n)
    if mask is not None:
        num_windows = mask.shape[0]
        bias = (bias.view(bw // num_windows, num_windows, heads, n, n) + mask[None, :, None].to(bias.dtype)).view(
            bw, heads, n, n
        )
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
    return attn.proj(out.transpose(1, 2).reshape(bw, n, c))


class LayerNorm3d(nn.Module):
    """LayerNorm over the channels of (B, C, D, H, W) maps (SAM's ``LayerNorm2d`` one dimension up)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


def neck_3d(in_dim: int, out_dim: int) -> nn.Sequential:
    """A trainable 3D neck: 1x1x1 conv to ``out_dim``, LayerNorm, 3x3x3 conv, LayerNorm (no conv biases), SAM's 2D
    neck one dimension up, as 3DSAM-adapter puts one after every feature level."""
    return nn.Sequential(
        nn.Conv3d(in_dim, out_dim, 1, bias=False),
        LayerNorm3d(out_dim),
        nn.Conv3d(out_dim, out_dim, 3, padding=1, bias=False),
        LayerNorm3d(out_dim),
    )


class VolumetricEncoder(nn.Module):
    """The trainable 2D-to-3D additions for a stock ``ImageEncoderViT``.

    ``forward(vit, x)``: x (B, 3, D, S, S) slices at SAM's input size -> neck embedding (B, prompt_dim, T, g, g)
    and the token maps after the blocks in ``feature_indices``, each (B, embed_dim, T, g, g).

    ``neck_dim`` (None: SAM's frozen 2D neck, slice by slice, gives the embedding): one trainable 3D neck
    (:func:`neck_3d`) per block in ``feature_indices``, whose last entry must be the last block; the embedding is
    the last neck's output and the features the other necks' outputs, each (B, neck_dim, T, g, g).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_blocks: int,
        num_slices: int,
        grid: int,
        slice_group: int,
        window: int,
        feature_indices: tuple[int, ...] = (),
        adapter_ratio: float = 0.25,
        attention: AttentionImpl = DEFAULT_ATTENTION,
        adapter_kind: AdapterKind | None = "dconv",
        neck_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.attention = check_attention(attention)
        assert num_slices % slice_group == 0, f"{num_slices} slices is not a multiple of the slice group {slice_group}"
        self.slice_group = slice_group
        self.window = window
        self.grid: Grid = (num_slices // slice_group, grid, grid)
        self.dims = window_dims(self.grid, window)
        self.feature_indices = tuple(feature_indices)
        # Depth-wise conv over each group of slices; the mean at initialisation (equal slices -> SAM's tokens).
        self.slice_embed = nn.Conv3d(
            embed_dim, embed_dim, (slice_group, 1, 1), stride=(slice_group, 1, 1), groups=embed_dim
        )
        nn.init.constant_(self.slice_embed.weight, 1.0 / slice_group)
        nn.init.zeros_(self.slice_embed.bias)
        self.depth_embed = nn.Parameter(torch.zeros(self.grid[0], embed_dim))
        self.rel_pos_d = nn.Parameter(torch.zeros(num_blocks, 2 * window - 1, embed_dim // num_heads))
        self.adapters: nn.ModuleList | None = None  # None: no adapters (the blocks alone, e.g. fully fine-tuned)
        self.adapter_position = BLOCK_ADAPTERS.get(adapter_kind or "", "before")
        if adapter_kind is not None:
            self.adapters = nn.ModuleList(
                self._adapter(adapter_kind, embed_dim, adapter_ratio, i, num_blocks) for i in range(num_blocks)
            )
        self.necks: nn.ModuleList | None = None
        if neck_dim is not None:
            assert self.feature_indices and self.feature_indices[-1] == num_blocks - 1, (
                f"3D necks need the last block among the feature blocks, got {self.feature_indices}"
            )
            self.necks = nn.ModuleList(neck_3d(embed_dim, neck_dim) for _ in self.feature_indices)
        # Swin-style alternation: odd blocks shift by half a window along axes that hold more than one window.
        half = tuple(w // 2 if n > w else 0 for n, w in zip(self.grid, self.dims))
        self.shifts: list[Grid] = [half if i % 2 == 1 else (0, 0, 0) for i in range(num_blocks)]  # type: ignore
        if self.attention == "sam":
            self.register_buffer("shift_mask", shifted_window_mask(self.grid, self.dims, half), persistent=False)
        else:
            for axis, mask in zip("dhw", shifted_window_axis_masks(self.grid, self.dims, half)):
                self.register_buffer(f"shift_mask_{axis}", mask, persistent=False)

    def _adapter(self, kind: str, dim: int, ratio: float, i: int, num_blocks: int) -> nn.Module:
        """The adapter of block i: an Adapter kind, or one of :data:`BLOCK_ADAPTERS`."""
        if kind == "st_adapter":
            return STAdapter(dim, ratio)
        if kind == "med_adapter":  # four stages of equal length; the last adapter of each links to the next stage
            stage = max(1, num_blocks // 4)
            return MedAdapter(dim, ratio, inter_stage=(i + 1) % stage == 0)
        return Adapter(dim, kind, self.grid[0], ratio=ratio, skip=True)

    def _adapt(self, i: int, x: torch.Tensor, carry: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block i's adapter on x (B, T, H, W, C); ``carry``: what a Med-Adapter passes on to the next stage."""
        b, t, h, w, c = x.shape
        tokens = x.reshape(b * t, h, w, c)
        adapter = self.adapters[i]
        if isinstance(adapter, MedAdapter):
            tokens, carry = adapter(tokens, t, carry)
        else:
            tokens = adapter(tokens, t)
        return tokens.view(b, t, h, w, c), carry

    def rel_tables(self, i: int, attn: Attention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Depth, height and width tables (2 * window - 1, head_dim) of block i."""
        length = 2 * self.window - 1
        table_h = resize_rel_table(attn.rel_pos_h, length)
        table_w = resize_rel_table(attn.rel_pos_w, length)
        return (table_h + table_w) / 2 + self.rel_pos_d[i], table_h, table_w

    def _block(
        self, i: int, block: Block, x: torch.Tensor, carry: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Block i (with its adapter) on x (B, T, H, W, C) -> (same shape, the adapters' carry)."""
        if self.adapters is not None and self.adapter_position == "before":
            x, carry = self._adapt(i, x, carry)
        shortcut = x
        x = block.norm1(x)
        shift = self.shifts[i]
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = window_partition_3d(x, self.dims)
        tables = self.rel_tables(i, block.attn)
        if self.attention == "sam":
            mask = self.shift_mask if any(shift) else None
            windows = window_attention_3d(block.attn, windows, self.dims, tables, mask)
        else:
            masks = [self.shift_mask_d, self.shift_mask_h, self.shift_mask_w] if any(shift) else None
            windows = window_attention_3d(block.attn, windows, self.dims, tables, None, masks, "sdpa")
        x = window_unpartition_3d(windows, self.dims, self.grid)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        x = shortcut + x
        x = x + block.mlp(block.norm2(x))
        if self.adapters is not None and self.adapter_position == "after":
            x, carry = self._adapt(i, x, carry)
        return x, carry

    def forward(self, vit: ImageEncoderViT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, _, d, s, _ = x.shape
        t, g, _ = self.grid
        assert d == t * self.slice_group, f"{d} slices != {t} tokens x slice group {self.slice_group}"
        tokens = vit.patch_embed(x.transpose(1, 2).flatten(0, 1))  # (B * D, g, g, C), frozen, slice-wise
        assert tokens.shape[1:3] == (g, g), f"token grid {tuple(tokens.shape[1:3])} != {(g, g)} (input {s} px)"
        c = tokens.shape[-1]
        tokens = tokens.view(b, d, g, g, c).permute(0, 4, 1, 2, 3)  # (B, C, D, g, g)
        x = self.slice_embed(tokens).permute(0, 2, 3, 4, 1)  # (B, T, g, g, C)
        assert vit.pos_embed is not None and vit.pos_embed.shape[1:3] == (g, g), (
            f"SAM pos_embed grid {None if vit.pos_embed is None else tuple(vit.pos_embed.shape[1:3])} != {(g, g)}: "
            "build SAM at the input size of this encoder"
        )
        x = x + vit.pos_embed[:, None] + self.depth_embed[None, :, None, None].to(x.dtype)
        features = []
        carry = None
        for i, block in enumerate(vit.blocks):
            x, carry = run_block_unit(self._block, i, block, x, carry)
            if i in self.feature_indices:
                features.append(x.permute(0, 4, 1, 2, 3))
        if self.necks is not None:
            necked = [neck(f) for neck, f in zip(self.necks, features)]
            return necked[-1], necked[:-1]
        neck = vit.neck(x.flatten(0, 1).permute(0, 3, 1, 2))  # slice-wise frozen 2D neck: (B * T, C', g, g)
        return neck.view(b, t, *neck.shape[1:]).transpose(1, 2), features
