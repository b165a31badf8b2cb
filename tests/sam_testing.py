"""Test helpers: SAM checkpoints in the official layout with random or stand-in weights."""

from __future__ import annotations

from pathlib import Path

import torch

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone, reference_shapes


def write_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Random tiny SAM weights in the official layout, as ``folder/sam_tiny.pth``."""
    torch.manual_seed(seed)
    path = Path(folder) / str(get_backbone("tiny").checkpoint_file)
    torch.save(build_sam(get_backbone("tiny")).state_dict(), path)
    return path


def write_standin_checkpoint(path: Path, backbone: str) -> Path:
    """A checkpoint with ``backbone``'s exact keys and shapes whose tensors are broadcast zeros (tiny files)."""
    state = {k: torch.zeros(1).expand(shape) if len(shape) else torch.zeros(()) for k, shape in
             reference_shapes(get_backbone(backbone)).items()}
    torch.save(state, path)
    return Path(path)
