"""Bottleneck adapters with optional depth mixing (vanilla, DMLP/DFused, DConv, and the ablations' variants).

Every adapter is ``fc_down -> activation -> fc_up`` with an optional depth mixer: in the middle (``dmlp``, the
DMLPAdapter / DFusedAdapter; ``dconv``, the DConvAdapter), or a depth MLP before ``fc_down`` (``dmlp_before``: MaskSAM
B7, Self-Prompt-SAM S4) or after ``fc_up`` (``dmlp_after``: MaskSAM B6, Self-Prompt-SAM S5). The up projection starts
at zero (and a depth MLP after it starts as the identity), so a freshly built adapter adds nothing and the adapted SAM
equals the frozen SAM at step 0.

Token layout: adapters take tokens ``x`` of shape (S, *spatial, C) where the S = V * depth rows are the
``depth`` consecutive slices of V volumes (slice index fastest). Depth mixers un-fold this to
(V, depth, *spatial, C) and never mix rows of different volumes or (for the MLP mixer) different positions.
Callers must pass the *unpartitioned* token grid, never window-partitioned tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

AdapterKind = Literal["vanilla", "dmlp", "dconv", "dmlp_before", "dmlp_after"]


def unfold_depth(x: torch.Tensor, depth: int) -> torch.Tensor:
    """(V * depth, ...) -> (V, depth, ...)."""
    assert x.shape[0] % depth == 0, f"leading dim {x.shape[0]} is not a multiple of depth {depth}"
    return x.view(x.shape[0] // depth, depth, *x.shape[1:])


class DepthMLPMixer(nn.Module):
    """Inverted-bottleneck MLP over the depth axis (two FC layers and an activation, with skip)."""

    def __init__(self, depth: int, expansion: int = 4, identity_init: bool = False) -> None:
        super().__init__()
        self.depth = depth
        self.fc1 = nn.Linear(depth, depth * expansion)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(depth * expansion, depth)
        if identity_init:  # the mixer starts as its skip connection
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """x: (V * depth, *spatial, C) -> same shape."""
        assert depth == self.depth, f"DepthMLPMixer built for {self.depth} slices, got {depth}"
        v = unfold_depth(x, depth).movedim(1, -1)  # (V, *spatial, C, depth)
        v = v + self.fc2(self.act(self.fc1(v)))
        return v.movedim(-1, 1).reshape(x.shape)


class DepthConvMixer(nn.Module):
    """Depth-wise 3D convolution (kernel 3, one filter per channel) over (depth, h, w), with skip."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """x: (V * depth, h, w, C) -> same shape."""
        assert x.dim() == 4, f"DepthConvMixer needs tokens on a (h, w) grid, got shape {tuple(x.shape)}"
        v = unfold_depth(x, depth).permute(0, 4, 1, 2, 3)  # (V, C, depth, h, w)
        v = v + self.conv(v)
        return v.permute(0, 2, 3, 4, 1).reshape(x.shape)


class Adapter(nn.Module):
    """Houlsby bottleneck ``dim -> dim * ratio -> dim`` with an optional depth mixer (see the module docstring).

    With ``skip`` the adapter returns ``x + branch(x)`` (placed after an attention layer); without, it returns
    only ``branch(x)`` (placed parallel to an MLP and added to its output). The depth MLPs of ``dmlp_before`` and
    ``dmlp_after`` act on the adapter's branch (its input and its output, width ``dim``), never on the block's
    residual stream.
    """

    def __init__(
        self, dim: int, kind: AdapterKind = "vanilla", depth: int = 1, ratio: float = 0.25, skip: bool = True
    ) -> None:
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.kind = kind
        self.skip = skip
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.mixer: nn.Module | None = None  # in the middle, on the hidden width
        self.mixer_before: nn.Module | None = None  # before fc_down, on the input
        self.mixer_after: nn.Module | None = None  # after fc_up, on the output
        if kind == "dmlp":
            self.mixer = DepthMLPMixer(depth)
        elif kind == "dconv":
            self.mixer = DepthConvMixer(hidden)
        elif kind == "dmlp_before":
            self.mixer_before = DepthMLPMixer(depth)
        elif kind == "dmlp_after":
            self.mixer_after = DepthMLPMixer(depth, identity_init=True)
        elif kind != "vanilla":
            raise ValueError(f"Unknown adapter kind '{kind}' (use vanilla, dmlp, dconv, dmlp_before or dmlp_after).")
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        """x: (V * depth, *spatial, dim) -> same shape."""
        h = x if self.mixer_before is None else self.mixer_before(x, depth)
        h = self.act(self.down(h))
        if self.mixer is not None:
            h = self.mixer(h, depth)
        h = self.up(h)
        if self.mixer_after is not None:
            h = self.mixer_after(h, depth)
        return x + h if self.skip else h
