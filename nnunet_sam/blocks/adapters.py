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

Kinds: :data:`ADAPTER_KINDS` maps each kind name to where its depth mixer sits and how it is built; a new kind is
its mixer class plus one entry (:func:`register_adapter_kind`), and every network that takes an adapter kind
(``AdapterKind`` option fields, the volumetric encoder) builds it from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

AdapterKind = str  # a key of ADAPTER_KINDS: "vanilla", "dmlp", "dconv", "dmlp_before", "dmlp_after" or a registered one


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


@dataclass(frozen=True)
class AdapterKindSpec:
    """Where an adapter kind's depth mixer sits and how it is built.

    ``position``: ``"middle"`` (on the hidden width, between the activation and ``fc_up``), ``"before"``
    (``fc_down``'s input, width ``dim``) or ``"after"`` (``fc_up``'s output, width ``dim``); None: no mixer.
    ``build(width, depth)``: the mixer (``forward(x, depth)``, shape kept) for tokens of ``width`` channels and
    ``depth`` slices per volume. A mixer after ``fc_up`` must start as the identity (the adapter adds nothing at
    step 0).
    """

    position: Literal["middle", "before", "after"] | None = None
    build: Callable[[int, int], nn.Module] | None = None


ADAPTER_KINDS: dict[str, AdapterKindSpec] = {
    "vanilla": AdapterKindSpec(),
    "dmlp": AdapterKindSpec("middle", lambda width, depth: DepthMLPMixer(depth)),
    "dconv": AdapterKindSpec("middle", lambda width, depth: DepthConvMixer(width)),
    "dmlp_before": AdapterKindSpec("before", lambda width, depth: DepthMLPMixer(depth)),
    "dmlp_after": AdapterKindSpec("after", lambda width, depth: DepthMLPMixer(depth, identity_init=True)),
}


def register_adapter_kind(name: str, spec: AdapterKindSpec) -> None:
    """Make ``name`` an adapter kind (an option value of every network that takes one); a name is registered
    once, so a saved model's kind always means the same mixer."""
    if name in ADAPTER_KINDS:
        raise ValueError(f"adapter kind '{name}' is already registered")
    if spec.position not in (None, "middle", "before", "after") or (spec.position is None) != (spec.build is None):
        raise ValueError(f"adapter kind '{name}': give a position (middle, before, after) together with a builder")
    ADAPTER_KINDS[name] = spec


def adapter_kind(name: AdapterKind) -> AdapterKindSpec:
    """The registered spec of kind ``name``; ValueError naming the registered kinds otherwise."""
    if name not in ADAPTER_KINDS:
        raise ValueError(f"Unknown adapter kind '{name}' (use {', '.join(ADAPTER_KINDS)}).")
    return ADAPTER_KINDS[name]


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
        spec = adapter_kind(kind)
        hidden = max(1, int(dim * ratio))
        self.kind = kind
        self.skip = skip
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.mixer: nn.Module | None = None  # in the middle, on the hidden width
        self.mixer_before: nn.Module | None = None  # before fc_down, on the input
        self.mixer_after: nn.Module | None = None  # after fc_up, on the output
        if spec.position == "middle":
            self.mixer = spec.build(hidden, depth)
        elif spec.position == "before":
            self.mixer_before = spec.build(dim, depth)
        elif spec.position == "after":
            self.mixer_after = spec.build(dim, depth)
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
