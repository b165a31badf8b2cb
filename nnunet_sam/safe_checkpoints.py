"""Reading nnU-Net checkpoints without running code from them.

A ``.pth`` file is a pickle: loaded as nnU-Net loads it (``weights_only=False``), a crafted checkpoint
in a model folder runs any code its author chose. Every checkpoint this package loads (prediction, prompted
prediction, RadSAM, the server, a trainer's ``--c``) is read by :func:`read_checkpoint` instead: torch's
``weights_only`` unpickler, which builds only tensors, plain containers and numbers, plus exactly the other types an
nnU-Net checkpoint holds (:data:`CHECKPOINT_TYPES`: numpy scalars in its training log). A file that needs anything
else is refused before any of it runs (:class:`UnsafeCheckpointError`).

nnU-Net's own loaders call ``torch.load`` directly; :func:`safe_checkpoint_loading` routes those calls through
:func:`read_checkpoint` while the package initialises nnU-Net's predictor or trainer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pickle import UnpicklingError  # the exception only: nothing here unpickles
from typing import Any

import numpy as np
import torch

_multiarray = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
# What an nnU-Net checkpoint holds beyond tensors, containers, numbers, strings and torch.device (which torch's
# weights_only unpickler builds itself): numpy scalars (np.float64, np.float32) of the training log and _best_ema.
CHECKPOINT_TYPES = (
    _multiarray.multiarray.scalar,
    np.dtype,
    np.dtypes.Float64DType,
    np.dtypes.Float32DType,
    np.dtypes.Int64DType,
)
_torch_load = torch.load  # torch's own, also while safe_checkpoint_loading replaces torch.load


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint that needs types no nnU-Net checkpoint holds (it could run code when loaded): refused unread."""


def _names(path: str | os.PathLike) -> str:
    try:
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in CHECKPOINT_TYPES}
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:  # noqa: BLE001  (the names only improve the message)
        return "objects"
    return ", ".join(names) or "objects"


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """The checkpoint at ``path`` loaded with ``weights_only=True`` and :data:`CHECKPOINT_TYPES` allowed.

    Raises :class:`UnsafeCheckpointError` (nothing of the file has run) if it needs any other type.
    """
    with torch.serialization.safe_globals(list(CHECKPOINT_TYPES)):
        try:
            return _torch_load(path, map_location=map_location, weights_only=True)
        except UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"{path} is refused: loading it needs {_names(path)}, which no nnU-Net checkpoint holds, and could "
                "run code. It was not loaded. Use a checkpoint written by nnUNetv2_train; if you made this file "
                "and trust it, load it yourself and save only its weights (torch.save of plain tensors and numbers)"
            ) from error
        except (RuntimeError, EOFError, OSError) as error:  # a zip that is no torch file, a truncated pickle...
            raise CheckpointReadError(
                f"{path} is not a loadable PyTorch checkpoint ({type(error).__name__}: {str(error)[:300]}); use a "
                "checkpoint written by nnUNetv2_train"
            ) from error


@contextlib.contextmanager
def safe_checkpoint_loading(check: Callable[[dict], None] | None = None) -> Iterator[None]:
    """Within this context every ``torch.load`` call (nnU-Net's included) reads with :func:`read_checkpoint`;
    ``check``, if given, sees each checkpoint before the caller gets it (and may raise)."""

    def load(f, map_location=None, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003  (torch.load's signature)
        checkpoint = read_checkpoint(f, map_location)
        if check is not None:
            check(checkpoint)
        return checkpoint

    torch.load = load
    try:
        yield
    finally:
        torch.load = _torch_load
