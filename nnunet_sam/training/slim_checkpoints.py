"""Slim nnU-Net checkpoints: the weights SAM's base checkpoint does not already hold, plus that file's SHA-256.

A SAM network's nnU-Net checkpoint normally holds every weight, so it runs anywhere on its own (nnU-Net's
convention and our default). With a frozen ViT-H that is 2.5 GB per checkpoint for a few MB of trained weights.
A slim checkpoint leaves out every ``sam.*`` tensor equal to the base checkpoint's (resized to the network's SAM
input, exactly as training loaded it) and records under :data:`BASE_KEY` which file that was and its SHA-256.

Loading goes through ``network.load_state_dict`` as always (nnU-Net's ``--c``, ``nnUNetv2_predict``,
``nnUNetPredictor``): :func:`attach_expansion` hooks the network so that a slim state dict is completed from the
base file found in ``$nnUNet_SAM_checkpoints`` after its hash is checked. A missing or different file is an
error naming both hashes; nothing is guessed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from nnunet_sam.backbones.checkpoints import (
    CHECKPOINT_DIR_ENV,
    CheckpointError,
    find_checkpoint,
    load_checkpoint,
    resize_to_input,
)
from nnunet_sam.backbones.sam_vit import AnySpec

BASE_KEY = "nnunet_sam.base_checkpoint"  # not a module name, so never a weight's key
SLIM_ENV = "nnUNet_SAM_slim_checkpoints"


class BaseCheckpointMismatchError(CheckpointError):
    """The base SAM checkpoint found is not the file a slim nnU-Net checkpoint was trained with."""


def slim_requested(attribute: bool | None) -> bool:
    """A trainer's ``slim_checkpoints`` attribute, or ``$nnUNet_SAM_slim_checkpoints`` (1/true/t) when it is None."""
    if attribute is not None:
        return attribute
    return os.environ.get(SLIM_ENV, "f").lower() in ("1", "true", "t")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (hex), computed once per (path, size, modification time)."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)  # nnUNetPredictor reloads the weights for every case: read the base file once
def _base_state(path: str, sha256: str, spec: AnySpec, input_size: int) -> dict[str, torch.Tensor]:
    state = resize_to_input(load_checkpoint(path, spec), spec, input_size)
    return {f"sam.{k}": v for k, v in state.items()}


def base_record(path: str | Path, spec: AnySpec, input_size: int) -> dict:
    """What a slim checkpoint stores under :data:`BASE_KEY` about its base file."""
    return {"file": Path(path).name, "sha256": file_sha256(path), "backbone": spec.name, "input_size": input_size}


def slim_state_dict(state: dict, record: dict, base_path: str | Path, spec: AnySpec) -> None:
    """Drop (in place) every ``sam.*`` tensor of ``state`` that equals the base file's; add ``record``."""
    base = _base_state(str(base_path), record["sha256"], spec, record["input_size"])
    for key in [k for k in state if k in base]:
        if state[key].shape == base[key].shape and torch.equal(state[key].detach().cpu(), base[key]):
            del state[key]
    state[BASE_KEY] = dict(record)


def expand_state_dict(state: dict, spec: AnySpec) -> None:
    """Complete a slim state dict (in place) from the verified base file; a full state dict is left as it is."""
    record = state.pop(BASE_KEY, None)
    if record is None:
        return
    if record["backbone"] != spec.name:
        raise CheckpointError(
            f"This slim checkpoint was trained on backbone '{record['backbone']}', the network is '{spec.name}'."
        )
    path = find_checkpoint(spec, required=False)
    wanted = f"{record['file']} (SHA-256 {record['sha256']})"
    if path is None:
        raise CheckpointError(
            f"This nnU-Net checkpoint stores only the trained weights (slim checkpoint); the frozen SAM weights come "
            f"from its base file {wanted}, which was not found. Put that file into the folder named by "
            f"${CHECKPOINT_DIR_ENV}."
        )
    found = file_sha256(path)
    if found != record["sha256"]:
        raise BaseCheckpointMismatchError(
            f"This slim nnU-Net checkpoint was trained with the base SAM checkpoint {wanted}, but {path} has SHA-256 "
            f"{found}: a different file. Frozen weights from it would give a different model. Put the original file "
            f"into ${CHECKPOINT_DIR_ENV}."
        )
    base = _base_state(str(path), found, spec, record["input_size"])
    for key, value in base.items():
        state.setdefault(key, value)


def attach_expansion(network: nn.Module, spec: AnySpec) -> nn.Module:
    """Let ``network.load_state_dict`` accept slim state dicts too (see :func:`expand_state_dict`)."""

    def hook(module, state_dict, prefix, *args) -> None:
        if prefix == "":  # the call on the network itself, before its children read their weights
            expand_state_dict(state_dict, spec)

    network.register_load_state_dict_pre_hook(hook)
    return network


@contextmanager
def slim_saving(network: nn.Module, record: dict, base_path: str | Path, spec: AnySpec) -> Iterator[None]:
    """Within this context ``network.state_dict()`` is slim (what nnU-Net's ``save_checkpoint`` then writes)."""

    def hook(module, state_dict, prefix, local_metadata) -> None:
        if prefix == "":
            slim_state_dict(state_dict, record, base_path, spec)

    handle = network.register_state_dict_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()
