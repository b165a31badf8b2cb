"""Checks of NIfTI files that nnU-Net's SimpleITK reader would read wrongly without a word.

ITK reads a ``.nii.gz`` cut short with the missing voxels set to 0, a zero or non-finite voxel spacing as 1 mm, and
NaN voxels as 0. Prediction (:mod:`nnunet_sam.inference.predict`), evaluation (:mod:`nnunet_sam.evaluation.folders`)
and the
submission writers therefore look at the file itself first (with nibabel): :func:`load_nifti` raises
:class:`DamagedFileError` naming the file and the problem, :func:`read_label_values` also returns the label values
of a label file as stored (refusing NaN and fractional values).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import tempfile
import zlib
from collections.abc import Sequence

import nibabel
import numpy as np

NIFTI_ENDINGS = (".nii", ".nii.gz")


class DamagedFileError(ValueError):
    """A file that cannot be read completely or correctly; the message names the file and the problem."""


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_ENDINGS)


def _stored_size(path: str) -> int:
    """Bytes of the file's content: decompressed for ``.gz`` (reading to the end checks the stream's CRC)."""
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"\x1f\x8b":
        raise DamagedFileError(
            f"{path} is named .gz but is not gzip-compressed (an uncompressed file?); rename it without .gz "
            "(e.g. .nii) or compress it with gzip"
        )
    size = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                size += len(chunk)
    except (EOFError, OSError, zlib.error) as error:  # BadGzipFile is an OSError
        raise DamagedFileError(
            f"{path} is damaged: its compressed stream is incomplete or corrupt ({type(error).__name__}: {error}); "
            "the file was probably cut short while being copied or written. Copy or export it again"
        ) from error
    return size


def load_nifti(path: str | os.PathLike) -> nibabel.Nifti1Image:
    """The NIfTI image at ``path`` after checking that every voxel the header promises is in the file and that
    its voxel spacing and affine are usable (finite, spacing > 0)."""
    path = str(path)
    if not os.path.isfile(path):
        raise DamagedFileError(f"{path} does not exist (or is not a file)")
    if os.path.getsize(path) == 0:
        raise DamagedFileError(f"{path} is empty (0 bytes); export it again")
    size = _stored_size(path)
    try:
        image = nibabel.load(path)
    except Exception as error:  # nibabel raises several types for a broken header
        raise DamagedFileError(f"{path} cannot be read as NIfTI ({type(error).__name__}: {error})") from error
    if isinstance(image, nibabel.Nifti2Image):
        raise DamagedFileError(
            f"{path} is a NIfTI-2 file, which ITK (nnU-Net's SimpleITK reader) cannot read; save it as NIfTI-1 "
            "(e.g. nibabel.save(nibabel.Nifti1Image(data, affine), path))"
        )
    header = image.header
    expected = int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if size < expected:
        raise DamagedFileError(
            f"{path} is truncated: it holds {size} bytes but its header describes {expected} "
            f"({'x'.join(map(str, header.get_data_shape()))} voxels of {header.get_data_dtype()}); ITK would fill the "
            "missing voxels with 0. Copy or export the file again"
        )
    spatial = min(3, len(header.get_data_shape()))
    zooms = _stored_pixdim(path)[1 : 1 + spatial]  # nibabel's header replaces a zero pixdim by 1, as ITK does
    if not (np.isfinite(zooms).all() and (zooms > 0).all()):
        raise DamagedFileError(
            f"{path} has the voxel spacing {zooms.tolist()} (pixdim) in its header: zero, negative or not finite. "
            "ITK would silently use 1 mm instead; fix the header (e.g. set the real spacing with nibabel)"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise DamagedFileError(
            f"{path} has a non-finite (NaN or inf) affine {affine[:3].round(4).tolist()}; the image has no "
            "position in space. Fix the header's qform/sform"
        )
    norms = np.linalg.norm(affine[:3, :spatial], axis=0)
    if not (norms > 0).all():
        raise DamagedFileError(
            f"{path} has an affine with a zero axis {affine[:3].round(4).tolist()} (zero voxel spacing); fix the "
            "header's qform/sform"
        )
    return image


def _stored_pixdim(path: str) -> np.ndarray:
    """The header's pixdim as stored in the file (nibabel's loaded header has already "fixed" zeros)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        block = f.read(540)
    header_class = nibabel.Nifti1Header
    if len(block) >= 4 and 540 in (int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")):
        header_class = nibabel.Nifti2Header  # sizeof_hdr 540: NIfTI-2 (its pixdim lies elsewhere, as float64)
    size = header_class.template_dtype.itemsize
    return np.asarray(header_class(binaryblock=block[:size], check=False)["pixdim"], dtype=np.float64)


def read_label_values(path: str | os.PathLike, allowed: Sequence[int] | None = None) -> np.ndarray:
    """The distinct values of the label file ``path`` as stored (after :func:`load_nifti`).

    Refuses NaN/inf and fractional values (label maps hold integers; a float file with integer values is fine)
    and, with ``allowed``, values outside it; every message names the file and the values found.
    """
    data = np.asanyarray(load_nifti(path).dataobj)
    values = np.unique(data)
    bad = values[~np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values[:0]
    if bad.size:
        count = int((~np.isfinite(data)).sum())
        raise DamagedFileError(f"{path} holds {count} non-finite voxel(s) (NaN or inf); a label map holds integers")
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise DamagedFileError(
            f"{path} holds fractional label values {[float(v) for v in fractional[:10]]}; a label map holds "
            "integers (was it resampled with linear interpolation? use nearest neighbour)"
        )
    if allowed is not None:
        unknown = sorted({int(v) for v in values} - {int(a) for a in allowed})
        if unknown:
            raise DamagedFileError(f"{path} holds label values {unknown} (allowed: {sorted(set(allowed))})")
    return values


def honour_umask(folder: str | os.PathLike) -> None:
    """Give ``folder`` (made 0700 by ``tempfile.mkdtemp``) the mode a new folder gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def is_finite_number(value: object) -> bool:
    """Whether ``value`` read from a JSON file is a finite number as a float64: not a bool, a string, NaN or inf,
    nor an integer too large for a float (``10**400``); ``10**30`` is 1e30 (numpy's ufuncs raise TypeError on
    such integers, so never call them on raw JSON values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def unwritable_folder(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder``, or None: a file in its place, no permission,
    a read-only or full file system. Checked before long work, so that it never runs for nothing."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f"{folder} is a file, not a folder"
    created = []  # the folders made for the probe, removed again (innermost first): the check leaves nothing
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"\0" * 65536)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        return f"cannot write into {folder}: {error.strerror or error}"
    finally:
        for made in created:
            with contextlib.suppress(OSError):
                os.rmdir(made)
    return None
