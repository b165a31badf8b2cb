"""Activation checkpointing of encoder blocks, switched on by a network option or by the trainer for one step.

Checkpointing changes how much memory a training step needs, never what it computes, so it is not part of a
saved model: the trainer decides it per run (``nnunet_sam.trainers.memory_controls``) and
turns it on around its forward passes with :func:`block_checkpointing`, the way ``torch.autocast`` is used.
Encoders run each block through :func:`run_block_unit`; a checkpointed block keeps only its input and recomputes
its activations in backward. A layer with state that its forward pass updates (batch norm's running statistics)
asks :func:`recomputing` and skips the update during that recomputation, so that it happens once per step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("nnunet_sam_block_checkpointing", default=False)
_RECOMPUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("nnunet_sam_recomputing", default=False)


@contextmanager
def block_checkpointing(enabled: bool = True) -> Iterator[None]:
    """Within this context, encoder blocks run with activation checkpointing (when gradients are enabled)."""
    token = _ACTIVE.set(enabled)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def checkpointing_active() -> bool:
    """Whether :func:`block_checkpointing` is on here."""
    return _ACTIVE.get()


def recomputing() -> bool:
    """Whether a checkpointed block is being recomputed in backward (its forward pass already ran this step)."""
    return _RECOMPUTING.get()


@contextmanager
def _recomputation() -> Iterator[None]:
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputation()


def run_block_unit(run: Callable[..., Any], *args, always: bool = False) -> Any:
    """``run(*args)``, checkpointed if ``always`` (a network option) or :func:`block_checkpointing` is on."""
    if (always or _ACTIVE.get()) and torch.is_grad_enabled():
        return checkpoint(run, *args, use_reentrant=False, context_fn=_contexts)
    return run(*args)
