"""DICOM in, DICOM SEG out: read a CT/MR series as nnU-Net reads a NIfTI file, and write a prediction as a DICOM
Segmentation that references the series it was predicted from.

Reading (:func:`read_series`) takes a folder of single-frame image instances (one series; ``series_uid`` picks one
of several) and builds the volume from the instances' own geometry: slices ordered by their position along the
slice normal (never by file name or instance number), the slice spacing from those positions (never from the
nominal ``SliceThickness``), each slice's ``RescaleSlope``/``RescaleIntercept`` applied. What would make a wrong
volume is refused with :class:`DicomError` naming the folder and the series or instance: several series, a
localiser, mixed orientations or pixel grids, two slices at one position, uneven gaps (a missing slice), a
multi-frame or non-image instance. :meth:`DicomSeries.image` returns the array and properties nnU-Net's SimpleITK
reader returns for the series' NIfTI conversion (C, Z, Y, X float32; ``sitk_stuff`` and ``spacing``), so the
prediction is the one of the converted file.

Writing (:func:`write_segmentation`) uses highdicom: one segment per label, named from the model's ``dataset.json``,
with a SNOMED CT code where the name maps to a known structure (:func:`segment_code`; a generic "Tissue" code
otherwise), the algorithm (nnunet-sam, its version, the trainer and its plans) and a reference to every source
instance per frame, written completely or not at all. pydicom and highdicom are the optional extra ``dicom``
(``pip install "nnunet-sam[dicom]"``); :func:`require` names it when missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nnunet_sam.training.fault_tolerance import staged_file

SEG_ENDING = ".dcm"
# positions may differ from an even grid by this fraction of the slice spacing (rounding in scanner software)
GAP_TOLERANCE = 0.01
ORIENTATION_TOLERANCE = 1e-4
EXTRA = 'pip install "nnunet-sam[dicom]"'
# a segment whose label name maps to none of the codes below gets this generic property (as 3D Slicer's default)
GENERIC = ("85756007", "Tissue")
_LESION_WORDS = {"tumor", "tumour", "lesion", "neoplasm", "cancer", "metastasis", "cyst", "nodule"}
_SYNONYMS = {"tumour": "Tumor", "urinary bladder": "Bladder", "ivc": "InferiorVenaCava", "gall bladder": "Gallbladder"}


class DicomError(ValueError):
    """A DICOM series that cannot be read into a correct volume, or a SEG that cannot be written; the message
    names the folder and the series or instance."""


def require(what: str, module: str = "highdicom"):
    """Import ``module`` (pydicom or highdicom) or raise :class:`DicomError` saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DicomError(f"{what} needs the optional package {module}: {EXTRA}") from None


def is_dicom_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Part 10 file (the "DICM" mark after the 128-byte preamble)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str | os.PathLike) -> list[str]:
    """The DICOM files directly inside ``folder`` (not below it), sorted by name; hidden files are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return [str(p) for p in names if p.name.upper() != "DICOMDIR" and is_dicom_file(p)]


def dicom_cases(folder: str | os.PathLike) -> dict[str, str]:
    """The DICOM series folders of a prediction input ``-i``: ``-i`` itself if it holds DICOM files (the case is
    named after the folder), and each sub-folder that holds DICOM files (named after the sub-folder)."""
    folder = Path(folder)
    cases = {folder.resolve().name: str(folder)} if dicom_files(folder) else {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if dicom_files(sub):
            cases[sub.name] = str(sub)
    return cases


def _instance(path: str, ds) -> str:
    number = ds.get("InstanceNumber")
    return f"{os.path.basename(path)} (instance {number})" if number is not None else os.path.basename(path)


@dataclass
class DicomSeries:
    """One series, its instances sorted along the slice normal (``files`` and headers ``datasets``, no pixels)."""

    folder: str
    files: list[str]
    datasets: list
    spacing: tuple[float, float, float]  # x, y, z (mm): pixel spacing columns, rows; slice distance
    origin: tuple[float, float, float]  # position of the first slice's first voxel (mm, patient coordinates)
    direction: tuple[float, ...]  # 3x3 row-major, columns = directions of x, y, z as SimpleITK

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    def image(self) -> tuple[np.ndarray, dict]:
        """The volume (1, Z, Y, X) float32 with rescale slope and intercept applied, and the properties nnU-Net's
        SimpleITK reader gives (``sitk_stuff``: spacing, origin, direction; ``spacing`` z, y, x)."""
        pydicom = require("reading a DICOM series", "pydicom")
        volume = np.empty((len(self.files), int(self.datasets[0].Rows), int(self.datasets[0].Columns)), np.float32)
        for z, (path, header) in enumerate(zip(self.files, self.datasets)):
            try:
                ds = pydicom.dcmread(path)
                pixels = ds.pixel_array
            except Exception as error:  # no decoder for the transfer syntax, truncated pixel data, ...
                syntax = header.file_meta.get("TransferSyntaxUID", "?") if hasattr(header, "file_meta") else "?"
                raise DicomError(
                    f"{self.folder}: the pixels of {_instance(path, header)} cannot be read (transfer syntax "
                    f"{syntax}; {type(error).__name__}: {error}). Decoders for compressed syntaxes: pip install "
                    "pylibjpeg pylibjpeg-openjpeg; or export the series uncompressed"
                ) from None
            if pixels.shape != volume.shape[1:]:
                shape = f"{pixels.shape}, not {volume.shape[1:]}"
                raise DicomError(f"{self.folder}: {_instance(path, header)} has pixels of shape {shape}")
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            volume[z] = pixels.astype(np.float64) * slope + intercept
        properties = {
            "sitk_stuff": {"spacing": self.spacing, "origin": self.origin, "direction": self.direction},
            "spacing": [abs(s) for s in self.spacing[::-1]],
        }
        return volume[None], properties


def _vector(ds, keyword: str, size: int, path: str, folder: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None or len(value) != size:
        raise DicomError(f"{folder}: {_instance(path, ds)} has no {keyword}; it cannot be placed in a volume")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def read_series(folder: str | os.PathLike, series_uid: str | None = None) -> DicomSeries:
    """Read the headers of the series in ``folder`` (the one with ``series_uid`` if given), check that they make
    one regular volume and sort them along the slice normal; raises :class:`DicomError` naming what is wrong."""
    pydicom = require("reading a DICOM series", "pydicom")
    folder = str(folder)
    files = dicom_files(folder)
    if not files:
        raise DicomError(f"{folder}: no DICOM file (with the DICM mark) in this folder")
    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as error:
            raise DicomError(f"{folder}: {os.path.basename(path)} is not a readable DICOM file ({error})") from None
        if "Rows" not in ds or "SeriesInstanceUID" not in ds:  # pydicom returns what it could parse, maybe nothing
            raise DicomError(
                f"{folder}: {os.path.basename(path)} is not a readable DICOM image: its header ends early or lacks "
                "Rows/SeriesInstanceUID (a damaged copy, or no image); remove or replace it"
            )
        headers.append((path, ds))
    by_series: dict[str, list] = {}
    for path, ds in headers:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if series_uid is not None:
        if series_uid not in by_series:
            raise DicomError(f"{folder}: no series {series_uid} here; its series: {_list_series(by_series)}")
        headers = by_series[series_uid]
    elif len(by_series) > 1:
        raise DicomError(
            f"{folder} holds {len(by_series)} series: {_list_series(by_series)}; choose one with --series UID "
            "(or put each series in its own folder)"
        )
    for path, ds in headers:
        if "LOCALIZER" in [str(v).upper() for v in ds.get("ImageType", [])]:
            raise DicomError(f"{folder}: {_instance(path, ds)} is a localiser (scout) image; remove it from the folder")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise DicomError(f"{folder}: {_instance(path, ds)} is a multi-frame instance; only single-frame slices")
        if "Rows" not in ds or "Columns" not in ds or "PixelSpacing" not in ds:
            raise DicomError(f"{folder}: {_instance(path, ds)} is not an image slice (no Rows/Columns/PixelSpacing)")
    if len(headers) < 2:
        raise DicomError(f"{folder}: one slice only; a volume needs at least 2 (its slice spacing is unknown)")
    orientations = [_vector(ds, "ImageOrientationPatient", 6, p, folder) for p, ds in headers]
    orientation = _odd_ones_out(folder, headers, orientations, "the orientation", "mixed orientations make no volume")
    grids = [np.array([ds.Rows, ds.Columns, *_vector(ds, "PixelSpacing", 2, p, folder)], float) for p, ds in headers]
    grid = _odd_ones_out(folder, headers, grids, "the pixel grid (rows, columns, spacing)", "mixed pixel grids")
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    points = np.array([_vector(ds, "ImagePositionPatient", 3, p, folder) for p, ds in headers])
    positions = points @ normal
    order = np.argsort(positions, kind="stable")
    headers, points = [headers[i] for i in order], points[order]
    # consecutive slices must lie along the normal: an in-plane shift (gantry tilt) makes a sheared volume
    shift = (points - points[0]) - np.outer((points - points[0]) @ normal, normal)
    sheared = np.flatnonzero(np.linalg.norm(shift, axis=1) > 0.01 * min(grid[2], grid[3]))
    if sheared.size:
        i = int(sheared[0])
        raise DicomError(
            f"{folder}: {_instance(*headers[i])} is shifted in plane by {np.linalg.norm(shift[i]):.3g} mm from "
            f"{_instance(*headers[0])} (gantry tilt?): the slices make a sheared volume; resample the series first"
        )
    steps = np.diff(positions[order])
    for i, step in enumerate(steps):
        if step < 1e-3:
            (a, da), (b, db) = headers[i], headers[i + 1]
            raise DicomError(f"{folder}: {_instance(a, da)} and {_instance(b, db)} lie at the same position")
    spacing_z = float(np.median(steps))
    uneven = np.flatnonzero(np.abs(steps - spacing_z) > GAP_TOLERANCE * spacing_z)
    if uneven.size:
        i = int(uneven[0])
        (a, da), (b, db) = headers[i], headers[i + 1]
        raise DicomError(
            f"{folder}: uneven slice positions: {steps[i]:g} mm between {_instance(a, da)} and {_instance(b, db)}, "
            f"{spacing_z:g} mm elsewhere (a missing slice?); give a complete series"
        )
    spacing_z = float((positions[order][-1] - positions[order][0]) / (len(headers) - 1))
    direction = np.stack([row, column, normal], axis=1)  # columns: x, y, z axes
    return DicomSeries(
        folder=folder,
        files=[p for p, _ in headers],
        datasets=[ds for _, ds in headers],
        spacing=(float(grid[3]), float(grid[2]), spacing_z),  # PixelSpacing is (row distance, column distance)
        origin=tuple(float(v) for v in _vector(headers[0][1], "ImagePositionPatient", 3, headers[0][0], folder)),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _odd_ones_out(folder: str, headers: list, values: list[np.ndarray], what: str, problem: str) -> np.ndarray:
    """The value most instances share; :class:`DicomError` naming the instances that differ from it, if any."""
    keys = [tuple(np.round(v, 4).tolist()) for v in values]  # equal within scanner rounding
    common = max(set(keys), key=keys.count)
    odd = [f"{_instance(p, ds)}: {list(k)}" for (p, ds), k in zip(headers, keys) if k != common]
    if odd:
        shown = "; ".join(odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        raise DicomError(
            f"{folder}: {len(keys) - len(odd)} instances have {what} {list(common)}, but {shown}; {problem}"
        )
    return values[keys.index(common)]  # the exact values, as stored


def _list_series(by_series: Mapping[str, list]) -> str:
    parts = []
    for uid, items in by_series.items():
        ds = items[0][1]
        description = str(ds.get("SeriesDescription", "")).strip()
        parts.append(f"{uid or '(no UID)'} ({len(items)} file(s){', ' + description if description else ''})")
    return "; ".join(parts)


# ---- DICOM Segmentation ------------------------------------------------------------------------------------------
def segment_code(name: str):
    """(category, property type) codes of a label name: SNOMED CT anatomy or lesion where the name maps to a known
    concept (``liver``, ``kidney_left`` -> Kidney, ``inferior_vena_cava``, ``liver_tumour`` -> Tumor), the
    generic "Tissue" otherwise."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    words = [w for w in re.split(r"[\s_\-]+", name.lower()) if w]
    lesion = next((w for w in words if w in _LESION_WORDS), None)
    if lesion is not None:
        concept = _SYNONYMS.get(lesion, lesion.capitalize())
        code = getattr(codes.SCT, concept, None) or codes.SCT.Lesion
        return Code("49755003", "SCT", "Morphologically Altered Structure"), code
    candidates = [" ".join(words), " ".join(w for w in words if w not in ("left", "right", "l", "r"))]
    for text in candidates:
        concept = _SYNONYMS.get(text, "".join(w.capitalize() for w in text.split()))
        code = getattr(codes.SCT, concept, None) if concept else None
        if code is not None:
            return codes.cid7150.AnatomicalStructure, code
    generic = Code(GENERIC[0], "SCT", GENERIC[1])
    return generic, generic


@dataclass
class Algorithm:
    """What made a segmentation, as written into the SEG's algorithm identification."""

    trainer: str
    plans: str = ""
    configuration: str = ""
    folds: str = ""

    @classmethod
    def of_model_folder(cls, model_folder: str, folds: Sequence = ()) -> Algorithm:
        """From an nnU-Net model folder name ``TRAINER__PLANS__CONFIGURATION``."""
        parts = os.path.basename(os.path.normpath(model_folder)).split("__")
        trainer, plans, configuration = (parts + ["", "", ""])[:3] if len(parts) == 3 else (parts[0], "", "")
        return cls(trainer, plans, configuration, ",".join(str(f) for f in folds))


REFERENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID")


def check_referencable(series: DicomSeries) -> None:
    """Raise :class:`DicomError` unless every instance carries the UIDs a Segmentation must reference (study,
    series, frame of reference, SOP class and a unique SOP instance UID); anonymisers sometimes blank them."""
    seen: dict[str, str] = {}
    for path, ds in zip(series.files, series.datasets):
        missing = [k for k in REFERENCE_UIDS if not str(ds.get(k, "") or "").strip()]
        if missing:
            raise DicomError(
                f"{series.folder}: {_instance(path, ds)} has no {', '.join(missing)}; a DICOM SEG could not reference "
                "it (an anonymiser blanked them?). Restore the UIDs, or write NIfTI only (--output-type nifti)"
            )
        uid = str(ds.SOPInstanceUID)
        if uid in seen:
            raise DicomError(f"{series.folder}: {_instance(path, ds)} and {seen[uid]} share the SOP instance UID {uid}")
        seen[uid] = _instance(path, ds)


def write_segmentation(
    series: DicomSeries,
    label_map: np.ndarray,
    labels: Mapping[int, str],
    output_file: str | os.PathLike,
    algorithm: Algorithm,
) -> None:
    """Write ``label_map`` (Z, Y, X, in the slice order of ``series``) as a binary DICOM Segmentation of
    ``series`` to ``output_file``, completely or not at all.

    ``labels``: label value -> name (background excluded); segment k (1, 2, ...) is the k-th value in ascending
    order. Slices without any label are left out (highdicom's default); every frame references its source instance.
    """
    hd = require("--output-type dicom_seg")
    pydicom = require("--output-type dicom_seg", "pydicom")
    from nnunet_sam import __version__

    check_referencable(series)
    values = sorted(int(v) for v in labels if int(v) != 0)
    if label_map.shape != (len(series.files), int(series.datasets[0].Rows), int(series.datasets[0].Columns)):
        raise DicomError(f"the segmentation {label_map.shape} does not match the series {series.folder}")
    unknown = sorted(set(np.unique(label_map).tolist()) - {0, *values})
    if unknown:
        raise DicomError(f"the segmentation holds label value(s) {unknown} that the model does not declare")
    lookup = np.zeros(max([0, *values, *np.unique(label_map).tolist()]) + 1, dtype=np.uint16)
    lookup[values] = np.arange(1, len(values) + 1)
    segments = lookup[label_map]
    identification = hd.AlgorithmIdentificationSequence(
        name="nnunet-sam",
        family=pydicom.sr.codedict.codes.cid7162.ArtificialIntelligence,
        version=__version__,
        parameters={
            k: v
            for k, v in (
                ("trainer", algorithm.trainer),
                ("plans", algorithm.plans),
                ("configuration", algorithm.configuration),
                ("folds", algorithm.folds),
            )
            if v
        },
    )
    descriptions = []
    for number, value in enumerate(values, start=1):
        category, property_type = segment_code(labels[value])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=str(labels[value])[:64],
                segmented_property_category=category,
                segmented_property_type=property_type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=identification,
                tracking_uid=hd.UID(),
                tracking_id=f"{labels[value]} (label {value})"[:64],
            )
        )
    try:
        seg = hd.seg.Segmentation(
            source_images=series.datasets,  # headers only: highdicom copies patient, study and frame attributes
            pixel_array=segments,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=_series_number(series.datasets[0]),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="nnunet-sam",
            manufacturer_model_name=algorithm.trainer[:64] or "nnunet-sam",
            software_versions=__version__,
            device_serial_number="0",
            series_description=f"{algorithm.trainer} segmentation"[:64],
        )
    except (ValueError, TypeError, AttributeError, KeyError) as error:  # e.g. a source without PatientBirthDate
        raise DicomError(
            f"{series.folder}: highdicom refused the segmentation: {type(error).__name__}: {error}"
        ) from None
    with staged_file(output_file) as temporary:
        seg.save_as(temporary)


def save_result(
    result: np.ndarray,
    series_folder: str | os.PathLike,
    output_file: str | os.PathLike,
    labels: Mapping[int, str],
    algorithm: Algorithm,
    series_uid: str | None = None,
) -> None:
    """A label map computed on a DICOM series -> its DICOM SEG (e.g. an interactive server's result).

    ``result``: (Z, Y, X) or (1, Z, Y, X), in the array order of ``read_series(series_folder).image()`` (what a client
    of ``nnunet_sam_serve`` uploads when it sends that array as its image); ``labels``: value -> name. The series is
    read again (headers only) so that every frame references its source instance; :class:`DicomError` for a series
    that cannot be read or referenced, or a result of another shape."""
    series = read_series(series_folder, series_uid)
    result = np.asarray(result)
    result = result[0] if result.ndim == 4 and result.shape[0] == 1 else result
    expected = (len(series.files), int(series.datasets[0].Rows), int(series.datasets[0].Columns))
    if result.shape != expected:
        raise DicomError(
            f"the result has shape {result.shape}, the series {series_folder} {expected} (slices, rows, columns): "
            "it must be in the order of read_series(folder).image()"
        )
    write_segmentation(series, result, labels, output_file, algorithm)


def _series_number(source) -> int:
    try:
        return (int(source.get("SeriesNumber", 0) or 0) + 1000) % 2**31
    except (TypeError, ValueError):
        return 1000
