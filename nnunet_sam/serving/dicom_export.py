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


SAVE_PATH = "/nnunet_sam/save_dicom_seg"


def _inside(root: str, relative, what: str) -> str:
    """``root``/``relative`` if it stays inside ``root`` (symlinks resolved), else :class:`InteractionError`."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise InteractionError(f"'{what}' must be a path relative to the server's --dicom-root, got {relative!r}")
    path = os.path.realpath(os.path.join(root, relative))
    if path != root and not path.startswith(root + os.sep):
        raise InteractionError(f"'{what}' {relative!r} leaves the server's --dicom-root")
    return path


def add_save_route(app, dicom_root: str, api_key: str | None, algorithm: dicom.Algorithm) -> None:
    """Opt-in endpoint of ``nnunet_sam_serve --dicom-root DIR``: ``POST /nnunet_sam/save_dicom_seg`` with the lease
    header (and the API key if the server has one) and the JSON ``{"series": FOLDER, "output": FILE.dcm,
    "label_name": NAME}`` (both paths relative to DIR) writes the session's result as a SEG of that series
    (:func:`save_session_as_seg`). Answers ``{"written": FILE.dcm}``; 400 for a path outside DIR, an existing
    output, a series that cannot be read or referenced, or a result of another shape; 401 and 410 as the other
    endpoints. Uses ``app.state.registry`` (the sessions of :func:`nnunet_sam.serving.app.make_app`)."""
    import secrets

    from fastapi import Header, HTTPException
    from nnInteractive.inference.remote import _protocol as wire

    from nnunet_sam.serving.sessions import LeaseError

    root = os.path.realpath(dicom_root)

    @app.post(SAVE_PATH)
    def save_dicom_seg(
        payload: dict,
        authorization: str | None = Header(default=None),
        token: str | None = Header(default=None, alias=wire.LEASE_HEADER),
    ) -> dict:
        if api_key is not None:
            given = (authorization or "").removeprefix("Bearer ")
            if not authorization or not secrets.compare_digest(given.encode(), api_key.encode()):
                raise HTTPException(401, detail="missing or wrong API key (send 'Authorization: Bearer KEY')")
        try:
            session = app.state.registry.get(token, active=True)
        except LeaseError as error:
            raise HTTPException(410, detail=str(error)) from None
        try:
            series = _inside(root, payload.get("series"), "series")
            output = _inside(root, payload.get("output"), "output")
            if not output.endswith(dicom.SEG_ENDING) or os.path.exists(output):
                raise InteractionError(f"'output' must be a new {dicom.SEG_ENDING} file, got {payload.get('output')!r}")
            if output.startswith(series + os.sep) or not os.path.isdir(os.path.dirname(output)):
                raise InteractionError("'output' must lie in an existing folder outside the series folder")
            label = str(payload.get("label_name") or "segment")
            save_session_as_seg(session, series, output, label, algorithm)
        except (InteractionError, dicom.DicomError) as error:
            raise HTTPException(400, detail=str(error)) from None
        return {"written": os.path.relpath(output, root)}
