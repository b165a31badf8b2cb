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
    state = {
        k: torch.zeros(1).expand(shape) if len(shape) else torch.zeros(())
        for k, shape in reference_shapes(get_backbone(backbone)).items()
    }
    torch.save(state, path)
    return Path(path)


def minimal_plans(patch_size: list[int], configuration: str = "3d_fullres") -> dict:
    """A plans dict with just what nnU-Net's PlansManager and our patch rule read."""
    return {
        "dataset_name": "Dataset999_Test",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * len(patch_size),
        "original_median_shape_after_transp": [64] * len(patch_size),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "continue_training": False,
        "configurations": {
            configuration: {
                "patch_size": list(patch_size),
                "data_identifier": "x",
                "batch_size": 2,
                "architecture": {"network_class_name": "none", "arch_kwargs": {}, "_kw_requires_import": []},
            }
        },
    }


def dataset_json(num_foreground: int = 3, **extra_labels) -> dict:
    labels = {"background": 0, **{f"organ{i}": i for i in range(1, num_foreground + 1)}, **extra_labels}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
