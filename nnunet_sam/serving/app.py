"""The HTTP endpoints of nnInteractive's remote protocol (paths, headers and array encoding from the
``nninteractive-client`` package), answered by a :class:`~nnunet_sam.serving.editors.ServedModel`.

Answers: 400 for an input the model cannot use (the message says why; the session is unchanged), 401 for a missing
or wrong API key, 410 for a missing, unknown or expired lease, 413 for an upload over the size limit, 503 when all
sessions are taken. Interactions answer the changed region: the ``X-Meta`` header holds ``{"ran_prediction",
"bbox"}`` and the body the packed target-buffer values inside ``bbox``.

Every network call runs under one lock (one model in memory, its work serialised); sessions are otherwise
independent and guarded by their own lock.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import struct
import threading
from contextlib import asynccontextmanager

import blosc2
import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response
from nnInteractive.inference.remote import _protocol as wire
from nnInteractive.inference.remote.serialization import pack_array, unpack_array
from starlette.concurrency import run_in_threadpool

from nnunet_sam import __version__
from nnunet_sam.serving import inputs
from nnunet_sam.serving.editors import INTERACTIONS, ServedModel
from nnunet_sam.serving.sessions import AtCapacity, LeaseError, Registry, Session


def _declared_bytes(body: bytes) -> int:
    """Uncompressed size an NNIA-packed array declares in its header (checked before anything is unpacked)."""
    try:
        _, _, _, ndim, name_len = struct.unpack_from("<4sBBBB", body, 0)
        dtype = np.dtype(body[8 : 8 + name_len].decode("ascii"))
        shape = struct.unpack_from(f"<{ndim}q", body, 8 + name_len)
    except (struct.error, TypeError, ValueError, UnicodeDecodeError) as error:
        raise inputs.InteractionError(
            f"the body is not a packed array (nninteractive-client format): {error}"
        ) from None
    if any(s < 0 for s in shape):
        raise inputs.InteractionError(f"the packed array declares a negative shape {list(shape)}")
    return int(np.prod(shape, dtype=np.float64)) * dtype.itemsize


def make_app(
    model: ServedModel,
    max_sessions: int = 4,
    idle_timeout: float = 600.0,
    liveness_timeout: float = 60.0,
    api_key: str | None = None,
    max_upload_mb: float = 2048.0,
    sweep_interval: float = 5.0,
    undo_depth: int = 20,
) -> FastAPI:
    """The FastAPI app serving ``model``; see the module docstring for the answers."""
    registry = Registry(max_sessions, idle_timeout, liveness_timeout, undo_depth)
    model_lock = threading.Lock()
    max_bytes = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        async def reaper():
            while True:
                await asyncio.sleep(sweep_interval)
                registry.sweep()

        task = asyncio.create_task(reaper())
        try:
            yield
        finally:
            task.cancel()
            registry.close_all()

    app = FastAPI(title="nnunet-sam interactive server", version=__version__, lifespan=lifespan)
    app.state.registry = registry

    @app.exception_handler(inputs.InteractionError)
    async def bad_input(_request: Request, error: inputs.InteractionError):
        return _json(400, {"detail": str(error)})

    @app.exception_handler(LeaseError)
    async def lease_gone(_request: Request, error: LeaseError):
        return _json(410, {"detail": str(error)})

    @app.middleware("http")
    async def size_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return _json(
                413,
                {
                    "detail": f"the upload of {int(length)} bytes exceeds the server's limit of {max_upload_mb:g} MB "
                    "(nnunet_sam_serve --max-upload-mb)"
                },
            )
        return await call_next(request)

    def require_key(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        given = (authorization or "").removeprefix("Bearer ")
        if not authorization or not secrets.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, detail="missing or wrong API key (send 'Authorization: Bearer KEY')")

    def session(active: bool):
        def lookup(token: str | None = Header(default=None, alias=wire.LEASE_HEADER)) -> Session:
            return registry.get(token, active=active)

        return Depends(lookup)

    auth = [Depends(require_key)]
    used, seen = session(active=True), session(active=False)

    def changed(ran: bool, change) -> Response:
        box, values = change
        meta = {"ran_prediction": bool(ran), "bbox": box}
        content = b"" if values is None else pack_array(np.ascontiguousarray(values), filters=[blosc2.Filter.NOFILTER])
        return Response(
            content=content, media_type=wire.CONTENT_TYPE_OCTET_STREAM, headers={wire.META_HEADER: _dumps(meta)}
        )

    def meta_of(request: Request) -> dict:
        raw = request.headers.get(wire.META_HEADER)
        try:
            meta = json.loads(raw) if raw else {}
        except json.JSONDecodeError as error:
            raise inputs.InteractionError(f"bad {wire.META_HEADER} header: {error}") from None
        if not isinstance(meta, dict):
            raise inputs.InteractionError(f"the {wire.META_HEADER} header must hold a JSON object")
        return meta

    async def array_of(request: Request) -> np.ndarray:
        body = await request.body()
        if len(body) > max_bytes:
            raise HTTPException(413, detail=f"the upload exceeds the server's limit of {max_upload_mb:g} MB")
        if _declared_bytes(body) > max_bytes:
            raise HTTPException(
                413,
                detail=f"the array would take {_declared_bytes(body)} bytes unpacked, over the server's limit of "
                f"{max_upload_mb:g} MB (nnunet_sam_serve --max-upload-mb)",
            )
        try:
            return unpack_array(body)
        except (ValueError, RuntimeError) as error:
            raise inputs.InteractionError(f"cannot unpack the uploaded array: {error}") from None

    def require(kind: str) -> None:
        if not model.supported.get(kind, False):
            offered = ", ".join(k for k in INTERACTIONS if model.supported.get(k))
            raise inputs.UnsupportedInteraction(
                f"Interaction '{kind}' is not supported by this {model.kind} model (it takes: {offered})"
            )

    # ---- leases and information ------------------------------------------------------------------------------
    @app.get(wire.PATH_HEALTHZ, dependencies=auth)
    def healthz() -> dict:
        return {"ok": True, "sessions": len(registry), "max_sessions": registry.max_sessions}

    @app.get(wire.PATH_CAPABILITIES, dependencies=auth)
    def capabilities() -> dict:
        return {
            "supported_interactions": {k: bool(model.supported.get(k)) for k in INTERACTIONS},
            "channel_mapping": {},
            "num_interaction_channels": 0,
            "supports_initial_label": model.supports_initial_label,
            "supports_zero_shot_label_refinement": False,
            "preferred_scribble_thickness": [1, 1, 1],
            "interaction_decay": None,
            "patch_size": model.patch_size,
            "do_autozoom": False,
            "inference_session_version": f"nnunet-sam {__version__} ({model.kind})",
            "license": "!!MISSING!!",
            "supports_undo": True,
            "model": model.kind,
        }

    @app.post(wire.PATH_CLAIM, dependencies=auth)
    def claim() -> dict:
        try:
            token = registry.claim()
        except AtCapacity as error:
            raise HTTPException(503, detail=str(error)) from None
        return {
            "lease_token": token,
            "idle_timeout_seconds": registry.idle_timeout,
            "liveness_timeout_seconds": registry.liveness_timeout,
            "max_sessions": registry.max_sessions,
        }

    @app.post(wire.PATH_RELEASE, dependencies=auth)
    def release(token: str | None = Header(default=None, alias=wire.LEASE_HEADER)) -> dict:
        return {"released": registry.release(token)}

    @app.post(wire.PATH_HEARTBEAT, dependencies=auth)
    def heartbeat(entry: Session = seen) -> dict:
        return {"remaining_seconds": registry.remaining(entry)}

    @app.get(wire.PATH_LEASE_STATUS, dependencies=auth)
    def lease_status(token: str | None = Header(default=None, alias=wire.LEASE_HEADER)) -> dict:
        entry = registry.get(token, touch=False)
        return {"remaining_seconds": registry.remaining(entry), "idle_timeout_seconds": registry.idle_timeout}

    # ---- image and buffer ------------------------------------------------------------------------------------
    @app.post(wire.PATH_SET_IMAGE, dependencies=auth)
    async def set_image(request: Request, entry: Session = used) -> dict:
        meta = meta_of(request)
        image = await array_of(request)

        def work() -> dict:
            inputs.check_image(image, model.num_channels)
            spacing = inputs.check_spacing(meta.get("image_properties") or {}, model.default_spacing)
            editor = model.open(image, spacing, model_lock)
            with entry.lock:
                entry.set_editor(editor)
            return {"original_image_shape": list(image.shape)}

        return await run_in_threadpool(work)

    @app.post(wire.PATH_SET_TARGET_BUFFER, dependencies=auth)
    def set_target_buffer(payload: dict, entry: Session = used) -> dict:
        with entry.lock:
            if entry.editor is None:
                raise inputs.InteractionError("no image in this session: call set_image before set_target_buffer")
            buffer = inputs.check_target_buffer(
                payload.get("shape"), payload.get("dtype"), entry.editor.shape, max_bytes
            )
            entry.set_buffer(buffer)
        return {}

    @app.post(wire.PATH_SET_DO_AUTOZOOM, dependencies=auth)
    def set_do_autozoom(payload: dict, entry: Session = used) -> dict:
        return {}  # the methods predict the whole volume; there is no zoom to switch

    @app.post(wire.PATH_RESET_INTERACTIONS, dependencies=auth)
    def reset_interactions(entry: Session = used) -> dict:
        with entry.lock:
            if entry.editor is not None and entry.buffer is not None:
                entry.reset()
        return {}

    @app.post(wire.PATH_UNDO, dependencies=auth)
    def undo(entry: Session = used) -> Response:
        with entry.lock:
            ran, change = entry.undo()
        return changed(ran, change)

    @app.post(wire.PATH_PREDICT, dependencies=auth)
    def predict(payload: dict, entry: Session = used) -> Response:
        return changed(False, (None, None))  # every interaction predicts at once: nothing is ever queued

    # ---- interactions ----------------------------------------------------------------------------------------
    @app.post(wire.PATH_ADD_POINT, dependencies=auth)
    def add_point(payload: dict, entry: Session = used) -> Response:
        require("points")
        positive = inputs.check_positive(payload)
        with entry.lock:
            position = inputs.check_point(payload.get("coordinates"), entry.ready().shape)
            return changed(True, entry.apply(lambda editor: editor.point(position, positive)))

    @app.post(wire.PATH_ADD_BBOX, dependencies=auth)
    def add_bbox(payload: dict, entry: Session = used) -> Response:
        positive = inputs.check_positive(payload)
        with entry.lock:
            box = inputs.check_box(payload.get("bbox_coords"), entry.ready().shape)
            require("bbox2d" if any(hi - lo == 1 for lo, hi in box) else "bbox3d")
            return changed(True, entry.apply(lambda editor: editor.box(box, positive)))

    async def mask_interaction(request: Request, entry: Session, kind: str) -> Response:
        require(kind)
        meta = meta_of(request)
        array = await array_of(request)
        positive = inputs.check_positive(meta)

        def work() -> Response:
            with entry.lock:
                mask = inputs.placed_mask(array, entry.ready().shape, meta.get("interaction_bbox"))
                return changed(True, entry.apply(lambda editor: getattr(editor, kind)(mask, positive)))

        return await run_in_threadpool(work)

    @app.post(wire.PATH_ADD_SCRIBBLE, dependencies=auth)
    async def add_scribble(request: Request, entry: Session = used) -> Response:
        return await mask_interaction(request, entry, "scribble")

    @app.post(wire.PATH_ADD_LASSO, dependencies=auth)
    async def add_lasso(request: Request, entry: Session = used) -> Response:
        return await mask_interaction(request, entry, "lasso")

    @app.post(wire.PATH_ADD_INITIAL_SEG, dependencies=auth)
    async def add_initial_seg(request: Request, entry: Session = used) -> Response:
        if not model.supports_initial_label:
            raise inputs.UnsupportedInteraction(
                f"Interaction 'initial_label' is not supported by this {model.kind} model: it cannot start from a mask"
            )
        array = await array_of(request)

        def work() -> Response:
            with entry.lock:
                shape = entry.ready().shape
                if array.shape != shape:
                    raise inputs.InteractionError(
                        f"the initial segmentation has shape {list(array.shape)} but the image's spatial shape is "
                        f"{list(shape)}"
                    )
                mask = array != 0
                entry.replace_buffer(array, lambda editor: editor.initial(mask))
            return changed(False, (None, None))  # the client has already written it into its buffer

        return await run_in_threadpool(work)

    return app


def _dumps(content) -> str:
    return json.dumps(content, separators=(",", ":"))


def _json(status: int, content: dict) -> Response:
    return Response(content=_dumps(content), status_code=status, media_type="application/json")
