"""3D point prompts (3DSAM-adapter): a visual sampler plus global queries, and clicks simulated from labels.

Points are voxel coordinates (z, y, x) of the network's input patch, in the order of nnU-Net's preprocessed
arrays; label k >= 1 marks a click on class k, 0 a click on background and -1 a padding point (ignored).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling import TwoWayTransformer
from torch import nn


def sample_points(features: torch.Tensor, points: torch.Tensor, volume_shape: Sequence[int]) -> torch.Tensor:
    """Visual sampler: features (B, C, T, H, W) covering a volume of ``volume_shape`` (D, Y, X) voxels, points
    (B, K, 3) voxel coordinates (z, y, x) -> (B, K, C), trilinearly interpolated at the voxel centres.

    Voxel i of an axis of n voxels is centred at (i + 0.5) / n of the extent, whatever the feature resolution,
    so on a feature map at voxel resolution an integer point returns exactly that voxel's feature vector.
    """
    assert features.dim() == 5 and points.dim() == 3 and points.shape[-1] == 3, (
        f"expected features (B, C, T, H, W) and points (B, K, 3), got {tuple(features.shape)}, {tuple(points.shape)}"
    )
    size = torch.tensor([float(n) for n in volume_shape], device=points.device)
    grid = (points.float() + 0.5) / size * 2 - 1  # normalised (z, y, x), align_corners=False convention
    grid = grid.flip(-1)[:, :, None, None].to(features.dtype)  # grid_sample wants (x, y, z): (B, K, 1, 1, 3)
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, :, 0, 0].transpose(1, 2)


POINT_EMBEDDINGS = ("sampler", "positional")  # a point's token: the image feature there, or its position's encoding


class PointPromptEncoder(nn.Module):
    """Image embedding (B, C, T, g, g) + points -> prompt-conditioned image embedding of the same shape.

    Tokens = learned global queries + (sampled feature + label embedding) per point. The tokens cross-attend to
    the image tokens (then an MLP), and the image tokens cross-attend to the tokens (padding points masked),
    a residual update of the embedding the mask decoder reads.
    """

    def __init__(self, dim: int, num_classes: int, num_queries: int = 8, num_heads: int = 8) -> None:
        super().__init__()
        self.label_embed = nn.Embedding(num_classes, dim)  # 0: background click, k: class k
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.token_to_image = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.image_to_token = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        volume_shape: Sequence[int],
    ) -> torch.Tensor:
        """embedding (B, C, T, g, g); points (B, K, 3) voxel (z, y, x), labels (B, K), or None (queries only)."""
        b, c = embedding.shape[:2]
        tokens = self.queries[None].expand(b, -1, -1).to(embedding.dtype)
        padding = torch.zeros(b, tokens.shape[1], dtype=torch.bool, device=embedding.device)
        if points is not None and points.shape[1] > 0:
            assert labels is not None and labels.shape == points.shape[:2], "labels (B, K) must come with points"
            sampled = sample_points(embedding, points, volume_shape)
            tokens = torch.cat([tokens, sampled + self.label_embed(labels.clamp(min=0)).to(sampled.dtype)], 1)
            padding = torch.cat([padding, labels < 0], 1)
        image = embedding.flatten(2).transpose(1, 2)  # (B, N, C)
        tokens = self.norm1(tokens + self.token_to_image(tokens, image, image, need_weights=False)[0])
        tokens = self.norm2(tokens + self.mlp(tokens))
        update = self.image_to_token(image, tokens, tokens, key_padding_mask=padding, need_weights=False)[0]
        image = self.norm3(image + update)
        return image.transpose(1, 2).reshape(embedding.shape)


class TwoWayPointPromptEncoder(nn.Module):
    """Point prompts through SAM's two-way transformer (3DSAM-adapter's prompt encoder): image embedding (B, C, T,
    g, g) + points -> prompt-conditioned embedding of the same shape.

    Tokens as in :class:`PointPromptEncoder` (global queries + sampled feature + label embedding per point; a
    padding point is a learned "not a point" token). Image positions: random Fourier features of the normalised
    (z, y, x) token centres (a fixed Gaussian matrix, saved with the model). The transformer's updated image
    tokens are the new embedding. ``point_embedding`` "positional" (3DSAM-adapter's ablation "visual sampler v.s.
    positional encoding"): a point's token is the Fourier feature of its position instead of the image feature
    sampled there (SAM's own point encoding, in 3D).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_queries: int = 8,
        num_heads: int = 8,
        depth: int = 2,
        mlp_dim: int = 2048,
        point_embedding: str = "sampler",
    ) -> None:
        super().__init__()
        assert point_embedding in POINT_EMBEDDINGS, f"point_embedding must be one of {POINT_EMBEDDINGS}"
        self.point_embedding = point_embedding
        self.label_embed = nn.Embedding(num_classes, dim)
        self.not_a_point = nn.Parameter(torch.zeros(dim))
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.register_buffer("fourier_matrix", torch.randn(3, dim // 2))
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, num_heads=num_heads, mlp_dim=mlp_dim)
        # Its last token-to-image attention only updates the tokens, which nothing reads here: frozen, not trained.
        self.transformer.final_attn_token_to_image.requires_grad_(False)
        self.transformer.norm_final_attn.requires_grad_(False)

    def fourier_features(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) coordinates in [-1, 1]^3 -> (..., C) random Fourier features."""
        projected = 2 * torch.pi * coords.float() @ self.fourier_matrix.float()
        return torch.cat([projected.sin(), projected.cos()], dim=-1)

    def positional_encoding(self, grid: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """(1, C, T, g, g) random Fourier features of the token centres in [-1, 1]^3."""
        axes = [(torch.arange(n, device=like.device, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in grid]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (T, g, g, 3)
        return self.fourier_features(coords).permute(3, 0, 1, 2)[None].to(like.dtype)

    def point_tokens(self, embedding: torch.Tensor, points: torch.Tensor, volume_shape: Sequence[int]) -> torch.Tensor:
        """(B, K, C): the image feature sampled at each point, or (``positional``) the Fourier feature of the point's
        voxel centre, normalised as the token centres are."""
        if self.point_embedding == "sampler":
            return sample_points(embedding, points, volume_shape)
        size = torch.tensor([float(n) for n in volume_shape], device=points.device)
        return self.fourier_features((points.float() + 0.5) / size * 2 - 1).to(embedding.dtype)

    def forward(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        volume_shape: Sequence[int],
    ) -> torch.Tensor:
        b, c = embedding.shape[:2]
        tokens = self.queries[None].expand(b, -1, -1).to(embedding.dtype)
        if points is not None and points.shape[1] > 0:
            assert labels is not None and labels.shape == points.shape[:2], "labels (B, K) must come with points"
            sampled = self.point_tokens(embedding, points, volume_shape)
            clicks = sampled + self.label_embed(labels.clamp(min=0)).to(sampled.dtype)
            padding = (labels < 0)[..., None]
            clicks = torch.where(padding, self.not_a_point.to(clicks.dtype).expand_as(clicks), clicks)
            tokens = torch.cat([tokens, clicks], 1)
        pe = self.positional_encoding(embedding.shape[2:], embedding).expand(b, -1, -1, -1, -1)
        # SAM's transformer flattens (B, C, H, W); a (B, C, T, g * g) view gives the same token order.
        _, image = self.transformer(embedding.flatten(3), pe.flatten(3), tokens)
        return image.transpose(1, 2).reshape(embedding.shape)


def simulate_points(
    target: torch.Tensor, num_classes: int, per_class: int = 1, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clicks from a label patch (B, 1, D, H, W): ``per_class`` voxels drawn uniformly from every foreground
    class present; absent classes get padding points. Returns points (B, K, 3) float voxel (z, y, x) and labels
    (B, K) long with K = (num_classes - 1) * per_class, ordered by class."""
    assert target.dim() == 5 and target.shape[1] == 1, f"expected a (B, 1, D, H, W) label, got {tuple(target.shape)}"
    b = target.shape[0]
    k = (num_classes - 1) * per_class
    points = torch.zeros(b, k, 3, device=target.device)
    labels = torch.full((b, k), -1, dtype=torch.long, device=target.device)
    for i in range(b):
        flat = target[i, 0].reshape(-1)
        for cls in range(1, num_classes):
            where = (flat == cls).nonzero()[:, 0]
            if where.numel() == 0:
                continue
            pick = torch.randint(where.numel(), (per_class,), generator=generator, device="cpu").to(where.device)
            idx = where[pick]
            coords = torch.stack(torch.unravel_index(idx, target.shape[2:]), -1).float()
            rows = slice((cls - 1) * per_class, cls * per_class)
            points[i, rows] = coords
            labels[i, rows] = cls
    return points, labels


def random_clicks(
    target: torch.Tensor, count: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` voxels drawn uniformly from the whole label patch (B, 1, D, H, W), each a click of the class found
    there (0: a background click). Returns points (B, count, 3) float voxel (z, y, x) and labels (B, count) long."""
    assert target.dim() == 5 and target.shape[1] == 1, f"expected a (B, 1, D, H, W) label, got {tuple(target.shape)}"
    b, shape = target.shape[0], target.shape[2:]
    flat = torch.randint(int(torch.tensor(shape).prod()), (b, count), generator=generator).to(target.device)
    coords = torch.stack(torch.unravel_index(flat, tuple(shape)), -1).float()
    labels = target.reshape(b, -1).gather(1, flat).long()
    return coords, labels
