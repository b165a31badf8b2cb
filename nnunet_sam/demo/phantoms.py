"""Synthetic multi-class 3D phantom datasets in nnU-Net v2 raw format.

Each case is a CT-like volume: "air" (-1000 HU) around an elliptical body of soft tissue (~40 HU) with a thin
fat rim, containing up to six non-overlapping "organs" of different shape and intensity:

====  =========  ============================================  ==========
label name       shape                                         CT (HU)
====  =========  ============================================  ==========
1     liver      large ellipsoid                               ~100
2     spleen     small (near-)sphere                           ~150
3     aorta      tube running through all slices               ~250
4     kidney     flattened disk (oblate ellipsoid)             ~200
5     stomach    box                                           ~70
6     bowel      ring (hollow cylinder along z)                ~120
====  =========  ============================================  ==========

Every case gets random position/size jitter, a smooth random bias field, a slight blur and Gaussian noise
(SD ~20 HU). An optional second channel has a different, MR-like contrast with independent noise. Shapes and
spacings are given in numpy (z, y, x) order; the files are written with SimpleITK (x, y, z) order.

Command line: ``nnunet_sam_make_phantom --help``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunet_sam.file_checks import honour_umask

__all__ = [
    "ORGAN_NAMES",
    "MIN_SHAPE",
    "MAX_ORGANS",
    "generate_case",
    "make_phantom_dataset",
    "phantom_origin",
]

#: organ names, label i + 1 is ORGAN_NAMES[i]
ORGAN_NAMES: tuple[str, ...] = ("liver", "spleen", "aorta", "kidney", "stomach", "bowel")
MAX_ORGANS = len(ORGAN_NAMES)
#: smallest supported (z, y, x) shape: every organ stays present and >= 3 slices thick
MIN_SHAPE: tuple[int, int, int] = (16, 32, 32)

AIR_HU = -1000.0
BODY_HU = 40.0
FAT_HU = -100.0
NOISE_SD_HU = 20.0
# nominal CT intensity per label (index 0 unused), per-case jitter of +-10 HU is added
ORGAN_HU: tuple[float, ...] = (0.0, 100.0, 150.0, 250.0, 200.0, 70.0, 120.0)
# second (MR-like) channel: arbitrary units, deliberately a different ordering than CT
MR_AIR, MR_FAT, MR_BODY = 0.0, 900.0, 350.0
ORGAN_MR: tuple[float, ...] = (0.0, 250.0, 550.0, 80.0, 700.0, 1000.0, 450.0)
MR_NOISE_SD = 30.0

CHANNEL_NAMES: tuple[str, str] = ("CT", "T2")  # "CT" -> CTNormalization, "T2" -> ZScoreNormalization
FILE_ENDING = ".nii.gz"
_MIN_RETAINED_FRACTION = 0.5


@dataclass(frozen=True)
class _Organ:
    kind: str  # ellipsoid | tube | box | ring
    center: tuple[float, float, float]  # normalised (z, y, x) in [-1, 1]
    size: tuple[float, float, float]  # semi-axes / half-extents (z, y, x); ring: (z half, outer r, inner r)


# Layout in normalised coordinates (x: left-right, y: anterior-posterior). The slots are disjoint for any
# jitter drawn in _jitter(), so painting order barely matters.
_ORGANS: tuple[_Organ, ...] = (
    _Organ("ellipsoid", (0.0, 0.05, -0.45), (0.55, 0.33, 0.28)),  # liver
    _Organ("ellipsoid", (0.15, 0.28, 0.53), (0.30, 0.16, 0.16)),  # spleen
    _Organ("tube", (0.0, 0.44, 0.05), (1.0, 0.09, 0.09)),  # aorta
    _Organ("ellipsoid", (-0.2, -0.36, 0.45), (0.33, 0.09, 0.17)),  # kidney
    _Organ("box", (0.3, -0.36, 0.01), (0.25, 0.11, 0.13)),  # stomach
    _Organ("ring", (-0.3, 0.03, 0.1), (0.30, 0.16, 0.08)),  # bowel
)


def phantom_origin(shape: Sequence[int], spacing: Sequence[float]) -> tuple[float, float, float]:
    """Image origin in SimpleITK (x, y, z) order for a (z, y, x) shape and spacing (non-trivial, centred)."""
    d, h, w = (int(s) for s in shape)
    sz, sy, sx = (float(s) for s in spacing)
    return (-0.5 * (w - 1) * sx + 3.25, -0.5 * (h - 1) * sy - 21.5, -400.0 - 0.5 * (d - 1) * sz)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised voxel-centre coordinates in [-1, 1], broadcastable (z, y, x)."""
    axes = [((np.arange(n, dtype=np.float64) + 0.5) / n) * 2.0 - 1.0 for n in shape]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _jitter(organ: _Organ, rng: np.random.Generator) -> _Organ:
    center = tuple(float(c + rng.uniform(-0.03, 0.03)) for c in organ.center)
    scale = rng.uniform(0.9, 1.1, size=3)
    if organ.kind == "ring":
        size = (organ.size[0] * scale[0], organ.size[1] * scale[1], organ.size[2] * scale[2])
        size = (size[0], size[1], min(size[2], 0.7 * size[1]))
    elif organ.kind == "tube":
        size = (organ.size[0], organ.size[1] * scale[1], organ.size[1] * scale[1])
    else:
        size = tuple(float(s * f) for s, f in zip(organ.size, scale))
    return _Organ(organ.kind, center, tuple(float(s) for s in size))  # type: ignore[arg-type]


def _organ_mask(organ: _Organ, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, phase: float) -> np.ndarray:
    cz, cy, cx = organ.center
    sz, sy, sx = organ.size
    if organ.kind == "ellipsoid":
        return ((zz - cz) / sz) ** 2 + ((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2 <= 1.0
    if organ.kind == "box":
        return (np.abs(zz - cz) <= sz) & (np.abs(yy - cy) <= sy) & (np.abs(xx - cx) <= sx)
    if organ.kind == "tube":  # gently curving tube through every slice
        x_c = cx + 0.04 * np.sin(np.pi * zz + phase)
        y_c = cy + 0.02 * np.cos(np.pi * zz + phase)
        return ((yy - y_c) / sy) ** 2 + ((xx - x_c) / sx) ** 2 <= 1.0
    if organ.kind == "ring":
        r2 = (yy - cy) ** 2 + (xx - cx) ** 2
        return (np.abs(zz - cz) <= sz) & (r2 <= sy**2) & (r2 >= sx**2)
    raise AssertionError(organ.kind)


def _bias_field(
    rng: np.random.Generator, zz: np.ndarray, yy: np.ndarray, xx: np.ndarray, amplitude: float
) -> np.ndarray:
    """Smooth random field (quadratic polynomial), roughly within +-amplitude."""
    terms = [zz, yy, xx, zz * yy, zz * xx, yy * xx, zz**2 - 1 / 3, yy**2 - 1 / 3, xx**2 - 1 / 3]
    coefs = rng.normal(0.0, amplitude / 3.0, size=len(terms))
    field = sum(c * t for c, t in zip(coefs, terms))
    return np.clip(field, -amplitude, amplitude)


def generate_case(
    shape: tuple[int, int, int] = (24, 96, 96),
    num_organs: int = 4,
    num_channels: int = 1,
    seed: int = 0,
    case_index: int = 0,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Generate one case: ([channel arrays (z, y, x)], label array), deterministic in (seed, case_index).

    Channel 0 is CT-like int16 (HU), channel 1 (if requested) MR-like float32; labels are uint8 0..num_organs.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(case_index)]))
    zz, yy, xx = _grid(shape)

    # body: elliptical cylinder through all slices, slightly varying along z, with a thin fat rim
    ax = 0.9 * rng.uniform(0.97, 1.03)
    ay = 0.75 * rng.uniform(0.97, 1.03)
    taper = 1.0 - 0.04 * zz**2
    body_r = np.sqrt((xx / (ax * taper)) ** 2 + (yy / (ay * taper)) ** 2)
    body = body_r <= 1.0
    fat = body & (body_r > 0.92)

    label = np.zeros(shape, dtype=np.uint8)
    masks: list[np.ndarray] = []
    phase = float(rng.uniform(0.0, 2.0 * np.pi))
    for i in range(num_organs):
        organ = _jitter(_ORGANS[i], rng)
        mask = _organ_mask(organ, zz, yy, xx, phase) & body
        label[mask] = i + 1
        masks.append(mask)
    for i, mask in enumerate(masks):
        total = int(mask.sum())
        kept = int((label[mask] == i + 1).sum())
        if total == 0 or kept <= _MIN_RETAINED_FRACTION * total:
            raise RuntimeError(
                f"phantom organ {ORGAN_NAMES[i]!r} lost (kept {kept}/{total} voxels) for shape "
                f"{shape}, seed {seed}, case {case_index}; use a larger shape"
            )

    ct_values = np.array(ORGAN_HU[: num_organs + 1]) + np.concatenate([[0.0], rng.uniform(-10, 10, num_organs)])
    ct = np.full(shape, AIR_HU)
    ct[body] = BODY_HU
    ct[fat] = FAT_HU
    ct[label > 0] = ct_values[label[label > 0]]
    ct = gaussian_filter(ct, sigma=(0.3, 0.7, 0.7))  # a little partial-volume blur
    ct = (ct - AIR_HU) * (1.0 + _bias_field(rng, zz, yy, xx, 0.05)) + AIR_HU
    ct += rng.normal(0.0, NOISE_SD_HU, size=shape)
    channels = [np.clip(np.rint(ct), -1024, 3071).astype(np.int16)]

    if num_channels == 2:
        mr_values = np.array(ORGAN_MR[: num_organs + 1]) * rng.uniform(0.95, 1.05, num_organs + 1)
        mr = np.full(shape, MR_AIR)
        mr[body] = MR_BODY
        mr[fat] = MR_FAT
        mr[label > 0] = mr_values[label[label > 0]]
        mr = gaussian_filter(mr, sigma=(0.3, 0.7, 0.7))
        mr = 1200.0 * np.tanh(mr / 900.0)  # nonlinear contrast compression
        mr *= np.exp(_bias_field(rng, zz, yy, xx, 0.15))
        mr = np.abs(mr + rng.normal(0.0, MR_NOISE_SD, size=shape))  # magnitude image: Rician-like noise floor
        channels.append(mr.astype(np.float32))
    return channels, label


def _write(array: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    img.SetOrigin(phantom_origin(array.shape, spacing))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path), useCompression=True)


def _validate(
    raw_root: Path,
    dataset_id: int,
    name: str,
    num_train: int,
    num_test: int,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    num_channels: int,
    num_organs: int,
    seed: int,
) -> None:
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999, got {dataset_id!r}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(f"name must be non-empty and contain only letters, digits, '_' or '-', got {name!r}")
    if not isinstance(num_train, int) or num_train < 1:
        raise ValueError(f"num_train must be an integer >= 1, got {num_train!r}")
    if not isinstance(num_test, int) or num_test < 0:
        raise ValueError(f"num_test must be an integer >= 0, got {num_test!r}")
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in shape):
        raise ValueError(f"shape must be three integers (D, H, W) in (z, y, x) order, got {shape!r}")
    if any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise ValueError(
            f"shape {tuple(shape)} too small: need at least {MIN_SHAPE} (D, H, W) so that every "
            "organ is present and a few slices thick"
        )
    if len(spacing) != 3 or any(
        isinstance(s, bool) or not (isinstance(s, numbers.Real) and math.isfinite(s) and s > 0) for s in spacing
    ):
        raise ValueError(f"spacing must be three positive finite numbers in (z, y, x) order, got {spacing!r}")
    if num_channels not in (1, 2):
        raise ValueError(f"num_channels must be 1 (CT) or 2 (CT + MR-like), got {num_channels!r}")
    if isinstance(num_organs, bool) or not isinstance(num_organs, int) or not 1 <= num_organs <= MAX_ORGANS:
        raise ValueError(f"num_organs must be an integer in 1..{MAX_ORGANS}, got {num_organs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if raw_root.exists() and not raw_root.is_dir():
        raise ValueError(f"raw_root {str(raw_root)!r} exists and is not a directory")


def make_phantom_dataset(
    raw_root: str | Path,
    dataset_id: int = 990,
    name: str = "Phantom",
    num_train: int = 12,
    num_test: int = 4,
    shape: tuple[int, int, int] = (24, 96, 96),
    spacing: tuple[float, float, float] = (3.0, 1.0, 1.0),
    num_channels: int = 1,
    num_organs: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a phantom dataset to ``raw_root/DatasetXXX_Name`` and return that folder.

    Contains imagesTr/labelsTr (cases ``case_000`` ...), imagesTs/labelsTs (held-out cases, numbered after the
    training cases; labelsTs are references for evaluation) and a dataset.json. Shape/spacing are (z, y, x).
    The dataset is written to a temporary sibling folder and renamed at the end, so a failure never leaves a
    half-written dataset behind.
    """
    raw_root = Path(raw_root)
    _validate(raw_root, dataset_id, name, num_train, num_test, shape, spacing, num_channels, num_organs, seed)
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))

    target = raw_root / f"Dataset{dataset_id:03d}_{name}"
    if target.exists() and not overwrite:
        raise ValueError(
            f"dataset folder {str(target)!r} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    prefix = f"Dataset{dataset_id:03d}_"
    if raw_root.is_dir():
        clashes = sorted(p.name for p in raw_root.iterdir() if p.name.startswith(prefix) and p.name != target.name)
        if clashes:
            raise ValueError(
                f"another dataset with id {dataset_id} exists in {str(raw_root)!r}: {clashes}; nnU-Net "
                "needs unique ids, choose a different id or remove it"
            )
    if num_train < 5:
        warnings.warn(
            f"num_train={num_train} < 5: nnU-Net's default 5-fold cross-validation split needs at "
            "least 5 training cases",
            stacklevel=2,
        )

    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=raw_root))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        for idx in range(num_train + num_test):
            split = "Tr" if idx < num_train else "Ts"
            case = f"case_{idx:03d}"
            channels, label = generate_case(shape, num_organs, num_channels, seed, idx)
            for c, arr in enumerate(channels):
                _write(arr, tmp / f"images{split}" / f"{case}_{c:04d}{FILE_ENDING}", spacing)
            _write(label, tmp / f"labels{split}" / f"{case}{FILE_ENDING}", spacing)

        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

        labels = {"background": 0}
        labels.update({ORGAN_NAMES[i]: i + 1 for i in range(num_organs)})
        generate_dataset_json(
            str(tmp),
            channel_names={str(c): CHANNEL_NAMES[c] for c in range(num_channels)},
            labels=labels,
            num_training_cases=num_train,
            file_ending=FILE_ENDING,
            dataset_name=target.name,
            description="Synthetic multi-organ CT-like phantom generated by nnunet_sam.demo.phantoms "
            f"(seed={seed}, shape zyx={list(shape)}, spacing zyx={list(spacing)}). "
            "labelsTs holds references for the test cases.",
            license="CC0 (synthetic data)",
            converted_by="nnunet_sam.demo.phantoms.make_phantom_dataset",
            numTest=num_test,
        )

        honour_umask(tmp)
        if target.exists():  # overwrite: move the old dataset aside, swap in the new one, then delete the old
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=raw_root))
            os.replace(target, old / target.name)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / target.name, target)  # put the old dataset back
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
