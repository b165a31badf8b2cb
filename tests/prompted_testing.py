"""A prompted predictor around a stand-in network that paints a ball of class k around every point of label k it is
given (shared by the prompted prediction and prompted evaluation tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from sam_testing import dataset_json, minimal_plans
from torch import nn

from nnunet_sam.inference.prompted import PromptedPredictor
from nnunet_sam.training.synthetic_plans import nnunet_preprocessing

SHAPE = (10, 30, 26)  # z, y, x of the test image
SPACING = (0.8, 0.7, 2.0)  # x, y, z (ITK order)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a rotation, so world/voxel mix-ups show
ORIGIN = (-10.0, 5.0, 40.0)
PATCH = [16, 16, 16]  # transposed axes (x, z, y): z is padded, x and y need overlapping windows


class Painter(nn.Module):
    """(B, C, D, H, W) -> logits with class k = 5 in a radius-2 ball around each point of label k, else background."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.prompt_encoder = nn.Identity()  # marks a prompted network
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append((points.clone(), labels.clone()))
        out = torch.zeros(x.shape[0], self.num_classes, *x.shape[2:])
        out[:, 0] = 1
        grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in x.shape[2:]], indexing="ij"), -1).float()
        for b in range(x.shape[0]):
            for point, label in zip(points[b], labels[b]):
                if label > 0:
                    out[b, int(label)][((grid - point).norm(dim=-1) <= 2)] = 5
        return out


def _plans() -> dict:
    plans = minimal_plans(PATCH)
    plans.update(transpose_forward=[2, 0, 1], transpose_backward=[1, 2, 0])
    plans["foreground_intensity_properties_per_channel"] = {"0": {}}  # unused by z-scoring
    # spacing transposed (x, z, y); the image is (0.8, 2.0, 0.7)
    plans["configurations"]["3d_fullres"].update(nnunet_preprocessing([1.0, 1.5, 1.0]))
    return plans


def _predictor(mirroring: bool = True) -> PromptedPredictor:
    plans = PlansManager(_plans())
    network = Painter(3)
    predictor = PromptedPredictor(
        tile_step_size=0.5, use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False
    )
    predictor.manual_initialization(
        network, plans, plans.get_configuration("3d_fullres"), [{}], dataset_json(2), "Painter", (0, 1, 2)
    )
    return predictor


def _image() -> sitk.Image:
    array = np.random.RandomState(0).uniform(1, 100, SHAPE).astype(np.float32)
    array[:, :, :3] = 0  # a zero band that nnU-Net crops away
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetDirection(DIRECTION)
    image.SetOrigin(ORIGIN)
    return image


def _write_case(folder: Path, case: str) -> sitk.Image:
    folder.mkdir(parents=True, exist_ok=True)
    image = _image()
    sitk.WriteImage(image, str(folder / f"{case}_0000.nii.gz"))
    return image
