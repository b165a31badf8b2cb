"""Save an interactive session's result as a DICOM SEG of the series its image came from.

A client that sends a DICOM series to ``nnunet_sam_serve`` as the array ``read_series(folder).image()[0]``
(:mod:`nnunet_sam.inference.dicom`; (1, Z, Y, X), slices in position order) gets results in that order, so the
server's copy of the target buffer maps voxel for voxel onto the series' instances. :func:`save_session_as_seg`
writes it (complete or not at all) with every frame referencing its source instance.
"""

from __future__ import annotations

import os

from nnunet_sam.inference import dicom
from nnunet_sam.serving.inputs import InteractionError
from nnunet_sam.serving.sessions import Session


def save_session_as_seg(
    session: Session,
    series_folder: str | os.PathLike,
    output_file: str | os.PathLike,
    label_name: str,
    algorithm: dicom.Algorithm,
    series_uid: str | None = None,
) -> None:
    """Write the session's current result (its target buffer, non-zero = the structure) as a one-segment DICOM SEG
    named ``label_name`` of the series in ``series_folder``; :class:`InteractionError` if the session has no result,
    :class:`~nnunet_sam.inference.dicom.DicomError` for a series that cannot be read or referenced or a result
    that does not fit it (nothing is written then)."""
    with session.lock:
        if session.buffer is None:
            raise InteractionError("no result in this session: set an image and a target buffer first")
        mask = (session.buffer != 0).astype("uint8")
    dicom.save_result(mask, series_folder, output_file, {1: label_name}, algorithm, series_uid)
