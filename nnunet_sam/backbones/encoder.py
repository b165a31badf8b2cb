"""The block-by-block view of an image encoder that trainable additions hook into.

Every backbone's image encoder is run as ``stem -> (enter_block(i), block i) for each token block -> neck`` on
channels-last tokens (S, h, w, C). A token block has an attention branch and an MLP branch; :func:`run_block`
runs one with two hooks:

* ``after_attention(a)`` receives the attention output on the unpartitioned (h, w) grid, before the residual
  addition, and returns what is added instead;
* ``beside_mlp(h)`` receives the MLP's normalised input and returns a term added to the MLP's output.

``attention`` names how a block computes its attention (:mod:`nnunet_sam.backbones.attention`: ``"sam"``, the stock
module, or ``"sdpa"``, the same function without N x N tensors); backbones whose blocks have one way only ignore it.

With identity / zero hooks every block computes exactly what the stock block computes. Block widths and grids
may change between blocks (hierarchical encoders such as TinyViT): ``enter_block(i, x)`` applies the stage
transition (patch merging) in front of block i, and the backbone spec lists the width of every block
(``spec.block_dims``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

Hook = Callable[[torch.Tensor], torch.Tensor]
BlockRunner = Callable[[nn.Module, torch.Tensor, Hook, Hook, str], torch.Tensor]


class BlockwiseEncoder(ABC):
    """Stem, token blocks, stage transitions and neck of one image encoder module (a view, holds no weights)."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder

    @property
    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The token blocks in execution order."""

    @abstractmethod
    def stem(self, images: torch.Tensor) -> torch.Tensor:
        """Images (S, 3, H, W) -> tokens (S, h, w, C) entering the first block."""

    def enter_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Bring the previous block's output to block i's grid and width (identity within a stage)."""
        return x

    @abstractmethod
    def neck(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block (S, g, g, C) -> image embedding (S, prompt_dim, g, g)."""


_ENCODERS: dict[type, type[BlockwiseEncoder]] = {}
_BLOCKS: dict[type, BlockRunner] = {}


def register_encoder(encoder_class: type, view: type[BlockwiseEncoder]) -> None:
    """Make :func:`blockwise` return ``view(encoder)`` for instances of ``encoder_class``."""
    _ENCODERS[encoder_class] = view


def register_block(block_class: type, runner: BlockRunner) -> None:
    """Make :func:`run_block` use ``runner(block, x, after_attention, beside_mlp, attention)`` for ``block_class``."""
    _BLOCKS[block_class] = runner


def _lookup(table: dict[type, object], obj: object, what: str) -> object:
    for cls in type(obj).__mro__:
        if cls in table:
            return table[cls]
    known = ", ".join(sorted(c.__name__ for c in table))
    raise TypeError(f"No blockwise support for the {what} {type(obj).__name__} (known: {known}).")


def blockwise(encoder: nn.Module) -> BlockwiseEncoder:
    """The blockwise view of an image encoder module built by :func:`nnunet_sam.backbones.sam_vit.build_sam`."""
    return _lookup(_ENCODERS, encoder, "image encoder")(encoder)


def run_block(
    block: nn.Module, x: torch.Tensor, after_attention: Hook, beside_mlp: Hook, attention: str = "sam"
) -> torch.Tensor:
    """Run one token block on x (S, h, w, C) with the two hooks and an attention implementation; (S, h, w, C)."""
    assert x.dim() == 4, f"token blocks take channels-last tokens (S, h, w, C), got {tuple(x.shape)}"
    return _lookup(_BLOCKS, block, "token block")(block, x, after_attention, beside_mlp, attention)
