"""Shared pieces of the dataset converters: input checks, staged writing, the conversion record, split files.

Every converter follows the same steps:

1. check the input (:func:`require_folder`, :func:`pair_cases`, :func:`check_case`), failing with a
   :class:`ConversionError` whose message names the folder, case and problem;
2. write the nnU-Net raw dataset inside :func:`staged_dataset`, a hidden temporary folder next to the
   target that is renamed into place only when everything (including the split file) was written, and
   removed on any error, so no half-written dataset is ever left;
3. write the conversion record ``nnunet_sam_conversion.json`` into the dataset folder
   (:func:`write_record`): nnU-Net case id <-> original case id and file names, nnU-Net label value <->
   original label value, and the protocol's train / val / test case lists. The submission writers read it
   to map predictions back;
4. write ``splits_final.json`` into ``$nnUNet_preprocessed/DatasetXXX_Name/`` (:func:`write_splits`),
   the file nnU-Net's trainer reads its folds from. :func:`finish_dataset` does 3 and 4 together.

Converters that run one of nnU-Net's own converters first take its output into the staging folder with
:func:`adopt_nnunet_output`. Every command's ``main`` ends in :func:`run_conversion` (the message and exit code of a
:class:`ConversionError`).

Protocol test cases go to ``imagesTs``/``labelsTs``, never to ``imagesTr``: nnU-Net's ``-f all`` trains on
every case of ``imagesTr``, whatever the split file says.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from unittest import mock

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import find_candidate_datasets

from nnunet_sam import exit_codes
from nnunet_sam.file_checks import DamagedFileError, honour_umask, is_nifti, load_nifti

RECORD_FILE = "nnunet_sam_conversion.json"
RECORD_FORMAT = 1
NIFTI = ".nii.gz"
DEFAULT_TOLERANCE = 1e-3  # mm for spacing/origin, cosine units for direction


class ConversionError(RuntimeError):
    """Bad converter input or target; the message says which file and what is wrong."""


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 0 < dataset_id < 1000:
        raise ConversionError(f"dataset id must be in 1..999, got {dataset_id}")
    return f"Dataset{dataset_id:03d}_{name}"


def require_folder(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"missing folder: {what} not found at {path}")
    return path


def nifti_cases(folder: Path, prefix: str = "") -> dict[str, Path]:
    """``{name without prefix and .nii.gz: path}`` for the NIfTI files in ``folder`` (hidden files skipped)."""
    found = {}
    for f in sorted(folder.iterdir()):
        if f.name.startswith((".", "_")) or not f.name.endswith(NIFTI) or not f.name.startswith(prefix):
            continue
        found[f.name[len(prefix) : -len(NIFTI)]] = f
    return found


def pair_cases(images: Mapping[str, Path], labels: Mapping[str, Path]) -> list[str]:
    """Case ids present in both; an image without a label (or a label without an image) is an error."""
    if not images:
        raise ConversionError("no images found in the input")
    for case, path in images.items():
        if case not in labels:
            raise ConversionError(f"image without label: {path} (case {case}) has no label file")
    for case, path in labels.items():
        if case not in images:
            raise ConversionError(f"label without image: {path} (case {case}) has no image file")
    return sorted(images)


def _header(path_or_image: str | os.PathLike | sitk.Image) -> sitk.ImageFileReader | sitk.Image:
    if isinstance(path_or_image, sitk.Image):
        return path_or_image
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path_or_image))
    reader.ReadImageInformation()
    return reader


def _rounded(values) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


def check_geometry(
    image: str | os.PathLike | sitk.Image,
    label: str | os.PathLike | sitk.Image,
    case: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> None:
    """Image and label must share size exactly and spacing, origin and direction within ``tolerance``."""
    a, b = _header(image), _header(label)
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        raise ConversionError(f"geometry mismatch in case {case}: image size {a.GetSize()} != label size {b.GetSize()}")
    for what in ("Spacing", "Origin", "Direction"):
        va, vb = getattr(a, f"Get{what}")(), getattr(b, f"Get{what}")()
        if not np.allclose(va, vb, rtol=0, atol=tolerance):
            raise ConversionError(
                f"geometry mismatch in case {case}: image {what.lower()} {_rounded(va)} != "
                f"label {what.lower()} {_rounded(vb)} (tolerance {tolerance})"
            )


def align_to_image(label: sitk.Image, image: sitk.Image, case: str, tolerance: float = DEFAULT_TOLERANCE) -> sitk.Image:
    """``label`` on ``image``'s voxel grid, when its header describes the same voxels in another axis order or
    orientation (e.g. flipped rows): every label voxel centre must fall on an image voxel centre and the two
    grids must cover the same voxels, so nearest-neighbour resampling only reorders voxels. Else an error."""
    size = np.array(label.GetSize())
    corners = [tuple(int(c) for c in (size - 1) * np.array(bits)) for bits in np.ndindex(2, 2, 2)]
    to_image = image.TransformPhysicalPointToContinuousIndex
    mapped = np.array([to_image(label.TransformIndexToPhysicalPoint(c)) for c in corners])
    on_grid = np.allclose(mapped, np.round(mapped), atol=1e-3)
    same_box = on_grid and np.array_equal(
        np.sort(np.round(mapped), axis=0)[[0, -1]], [[0, 0, 0], np.array(image.GetSize()) - 1]
    )
    if not (same_box and np.allclose(sorted(label.GetSpacing()), sorted(image.GetSpacing()), atol=tolerance)):
        raise ConversionError(
            f"geometry mismatch in case {case}: the label does not cover the image's voxel grid "
            f"(label size {label.GetSize()}, origin {_rounded(label.GetOrigin())}, direction "
            f"{_rounded(label.GetDirection())}; image size {image.GetSize()}, origin {_rounded(image.GetOrigin())}, "
            f"direction {_rounded(image.GetDirection())})"
        )
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def check_label_values(values: Iterable[float], allowed: Iterable[int], case: str) -> None:
    """Refuse NaN/inf and fractional label values (a float file with integer values is fine) and values outside
    ``allowed``; the message names the case and the values found."""
    values = np.asarray(list(values), dtype=np.float64)
    allowed = {int(a) for a in allowed}
    if not np.isfinite(values).all():
        raise ConversionError(f"non-finite (NaN or inf) label values in case {case}; a label map holds integers")
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise ConversionError(
            f"fractional label values in case {case}: {fractional[:10].tolist()} (a label map holds integers: was it "
            f"resampled with linear interpolation? allowed: {sorted(allowed)})"
        )
    unexpected = sorted({int(v) for v in values} - allowed)
    if unexpected:
        raise ConversionError(
            f"label values outside the protocol in case {case}: {unexpected} (allowed: {sorted(allowed)})"
        )


def label_values(label: str | os.PathLike | sitk.Image) -> np.ndarray:
    img = label if isinstance(label, sitk.Image) else sitk.ReadImage(str(label))
    return np.unique(sitk.GetArrayViewFromImage(img))


def check_files(case: str, image: Path | None = None, label: Path | None = None) -> None:
    """NIfTI files complete and readable as stored (:mod:`nnunet_sam.file_checks`: a file cut short, which ITK fills
    with zeros; zero or NaN spacing; NaN or fractional label voxels, which the relabelling would turn into
    background); :class:`ConversionError` naming the case and the file. Other formats (DICOM, MHA) are ITK's."""
    try:
        if image is not None and is_nifti(image):
            load_nifti(image)
        if label is not None and is_nifti(label):
            stored = np.asanyarray(load_nifti(label).dataobj)
            if np.issubdtype(stored.dtype, np.floating) and not np.isfinite(stored).all():
                raise DamagedFileError(
                    f"{label} holds {int((~np.isfinite(stored)).sum())} non-finite label voxel(s) (NaN or inf); a "
                    "label map holds integers"
                )
    except DamagedFileError as error:
        raise ConversionError(f"case {case}: {error}") from None


def check_case(
    image: Path, label: Path, case: str, allowed: Iterable[int], tolerance: float = DEFAULT_TOLERANCE
) -> None:
    """Files (:func:`check_files`), geometry (headers) and label values of one image/label pair."""
    check_files(case, image, label)
    check_geometry(image, label, case, tolerance)
    check_label_values(label_values(label), allowed, case)


def relabel(label: sitk.Image, mapping: Mapping[int, int]) -> sitk.Image:
    """Map label values with ``mapping`` (values not in it -> 0); geometry is copied unchanged. The label values must
    be integers (:func:`check_label_values`); float files holding integer values are cast."""
    arr = sitk.GetArrayFromImage(label)
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.isfinite(arr).all() and np.array_equal(arr, np.round(arr))):
            raise ConversionError("a label map to relabel holds fractional or non-finite values")
        arr = arr.astype(np.int64)
    if arr.size and int(arr.min()) < 0:
        raise ConversionError(f"negative label values {sorted(set(arr[arr < 0].tolist()))} cannot be relabelled")
    lut = np.zeros(int(max(int(arr.max()), max(mapping))) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[int(src)] = int(dst)
    out = sitk.GetImageFromArray(lut[arr])
    out.CopyInformation(label)
    return out


def ensure_id_free(dataset_id: int) -> None:
    taken = find_candidate_datasets(dataset_id)
    if len(taken):
        names = sorted(str(t) for t in set(taken))
        raise ConversionError(
            f"dataset id {dataset_id} is already taken by {names} in nnUNet_raw, nnUNet_preprocessed or "
            "nnUNet_results; choose another id with -d"
        )


@contextmanager
def staged_dataset(dataset_id: int, name: str) -> Iterator[Path]:
    """Yield a hidden temporary folder in ``$nnUNet_raw``; renamed to ``DatasetXXX_name`` when the block ends
    without error, removed (with a split file the block wrote) otherwise."""
    ensure_id_free(dataset_id)
    raw = Path(os.fspath(nnUNet_raw))  # raises nnU-Net's own message when unset
    raw.mkdir(parents=True, exist_ok=True)
    folder_name = dataset_folder_name(dataset_id, name)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}.partial-", dir=raw))
    splits = _splits_path(folder_name)
    try:
        try:
            yield staging
            honour_umask(staging)
            os.rename(staging, raw / folder_name)
        except (OSError, RuntimeError) as error:  # RuntimeError: ITK's writer on a full disk
            if isinstance(error, ConversionError):
                raise
            raise ConversionError(
                f"writing the dataset into {raw} failed ({type(error).__name__}: {str(error).strip()[:300]}); is the "
                "disk full or read-only? Nothing was converted"
            ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if splits.is_file():
            splits.unlink()
            if not any(splits.parent.iterdir()):
                splits.parent.rmdir()
        raise


def write_dataset_json(
    folder: Path, dataset_id: int, name: str, channel_names: dict, labels: dict, num_training: int, **extra
) -> None:
    """nnU-Net's ``dataset.json`` (NIfTI files) in the staging ``folder``, named as the dataset's folder will be."""
    generate_dataset_json(
        str(folder),
        channel_names,
        labels,
        num_training_cases=num_training,
        file_ending=NIFTI,
        dataset_name=dataset_folder_name(dataset_id, name),
        **extra,
    )


def write_record(
    folder: Path,
    *,
    protocol: str,
    source: Path,
    label_map: Mapping[int, int],
    cases: Mapping[str, dict],
    splits: Mapping[str, list[str]],
    **extra,
) -> dict:
    """Save the conversion record; ``label_map`` is nnU-Net value -> original value, ``cases`` maps each
    nnU-Net case id to at least ``original_id`` and ``submission_name``."""
    record = {
        "format": RECORD_FORMAT,
        "protocol": protocol,
        "source": str(Path(source).resolve()),
        "labels_nnunet_to_original": {str(k): int(v) for k, v in sorted(label_map.items())},
        "cases": dict(sorted(cases.items())),
        "splits": {k: sorted(v) for k, v in splits.items()},
        **extra,
    }
    (Path(folder) / RECORD_FILE).write_text(json.dumps(record, indent=1))
    return record


def same_name_cases(cases: Iterable[str]) -> dict[str, dict]:
    """The record's ``cases`` where nnU-Net's case id is the original one and the submission file is named by it."""
    return {c: {"original_id": c, "submission_name": f"{c}{NIFTI}"} for c in cases}


def finish_dataset(
    folder: Path, dataset_id: int, name: str, folds: list[dict[str, list[str]]] | None = None, **record
) -> Path:
    """Write the conversion record (``record``: the keywords of :func:`write_record`) into the staging ``folder`` and
    nnU-Net's split file, ``folds`` or by default one fold of the protocol's own ``train`` and ``val`` cases; return
    where the dataset stands once :func:`staged_dataset` has renamed it."""
    write_record(folder, **record)
    split = record["splits"]
    write_splits(dataset_id, name, folds if folds is not None else [{"train": split["train"], "val": split["val"]}])
    return folder.parent / dataset_folder_name(dataset_id, name)


def adopt_nnunet_output(module: ModuleType, folder: Path, convert: Callable[[], object]) -> None:
    """Run one of nnU-Net's converters (``convert``, from ``module``) into the staging ``folder`` and move the one
    dataset folder it writes (``Dataset<id>_<its name>``) up into ``folder`` itself."""
    with mock.patch.object(module, "nnUNet_raw", str(folder)):  # it writes to $nnUNet_raw: point it at the staging
        convert()
    (produced,) = [p for p in folder.iterdir() if p.is_dir()]
    for item in produced.iterdir():
        os.replace(item, folder / item.name)
    produced.rmdir()


def run_conversion(command: str, convert: Callable[[], Path], report: Callable[[Path], str] | None = None) -> int:
    """A converter command's end: run ``convert``; print ``wrote FOLDER`` (or ``report(folder)``) and return
    :data:`~nnunet_sam.exit_codes.DONE`, or the :class:`ConversionError`'s message and the exit code of unusable
    input."""
    try:
        out = convert()
    except ConversionError as e:
        return exit_codes.error(command, e)
    print(report(out) if report is not None else f"wrote {out}")
    return exit_codes.DONE


def read_record(dataset_folder: str | os.PathLike) -> dict:
    path = Path(dataset_folder) / RECORD_FILE
    if not path.is_file():
        raise ConversionError(f"no conversion record {RECORD_FILE} in {dataset_folder}: convert with nnunet_sam_*")
    return json.loads(path.read_text())


def _splits_path(folder_name: str) -> Path:
    return Path(os.fspath(nnUNet_preprocessed)) / folder_name / "splits_final.json"


def write_splits(dataset_id: int, name: str, folds: list[dict[str, list[str]]]) -> Path:
    """Write nnU-Net's ``splits_final.json`` (a list of ``{"train": [...], "val": [...]}``)."""
    for i, fold in enumerate(folds):
        if set(fold) != {"train", "val"} or set(fold["train"]) & set(fold["val"]):
            raise ConversionError(f"fold {i} must have disjoint 'train' and 'val' lists, got keys {sorted(fold)}")
        if not fold["train"] or not fold["val"]:
            raise ConversionError(
                f"fold {i} would have {len(fold['train'])} training and {len(fold['val'])} validation case(s): too "
                "few cases for this protocol's split (nnU-Net cannot train or validate such a fold); add cases"
            )
    path = _splits_path(dataset_folder_name(dataset_id, name))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps([{"train": sorted(f["train"]), "val": sorted(f["val"])} for f in folds], indent=1))
    os.replace(tmp, path)
    return path


def split_fractions(cases: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, list[str]]:
    """Shuffle ``cases`` with ``seed`` and cut train/val/test by ``fractions`` (rounded; test takes the rest)."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ConversionError(f"split fractions must be three numbers summing to 1, got {fractions}")
    order = [str(c) for c in np.random.RandomState(seed).permutation(sorted(cases))]
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {k: sorted(v) for k, v in parts.items()}


def move_cases_to_test(folder: Path, cases: Iterable[str]) -> None:
    """Move staged cases from imagesTr/labelsTr to imagesTs/labelsTs (all channels)."""
    for sub in ("imagesTs", "labelsTs"):
        (folder / sub).mkdir(exist_ok=True)
    for case in cases:
        channels = sorted((folder / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{NIFTI}"))
        if not channels:
            raise ConversionError(f"case {case} not found in the staged imagesTr")
        for f in channels:
            os.replace(f, folder / "imagesTs" / f.name)
        os.replace(folder / "labelsTr" / f"{case}{NIFTI}", folder / "labelsTs" / f"{case}{NIFTI}")
