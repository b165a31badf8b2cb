"""nnunet_sam_serve closed to strangers and bounded: no key beyond loopback, the Bearer scheme, the upload limit on
a streamed body, every option checked, Retry-After, the [serve] extra named, the undo log's memory, absurd spacings,
malformed bodies and headers answered 400 (never 500). Through the real nninteractive-client where a client is
involved."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import struct
import sys
import time

import httpx
import numpy as np
import pytest
from serving_testing import ThreadedServer

pytest.importorskip("fastapi")
import uvicorn  # noqa: E402
from nnInteractive.inference.remote import (  # noqa: E402
    ServerAtCapacityError,
    nnInteractiveRemoteInferenceSession,
)
from nnInteractive.inference.remote._protocol import LEASE_HEADER, META_HEADER  # noqa: E402
from nnInteractive.inference.remote.serialization import pack_array  # noqa: E402

from nnunet_sam.cli import serve  # noqa: E402
from nnunet_sam.serving.app import make_app  # noqa: E402


@pytest.fixture
def served(monkeypatch):
    """uvicorn.run replaced by a recorder of (host, port); the signal handlers and gc state main() changes restored."""
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, **_: calls.append((host, port)))
    monkeypatch.delenv(serve.API_KEY_VARIABLE, raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield calls
    for s, handler in handlers.items():
        signal.signal(s, handler)
    import gc

    gc.unfreeze()


def _start(client, image: np.ndarray, spacing) -> np.ndarray:
    client.set_image(image, {"spacing": spacing})
    buffer = np.zeros(image.shape[1:], dtype=np.uint8)
    client.set_target_buffer(buffer)
    return buffer


def _refused(call, status: int, message: str) -> None:
    with pytest.raises(httpx.HTTPStatusError) as error:
        call()
    assert error.value.response.status_code == status, error.value.response.text
    assert message in error.value.response.json()["detail"], error.value.response.text


# ---- 6. no key beyond loopback unless the user says so --------------------------------------------------------
def test_no_key_beyond_loopback_is_refused_unless_asked_for_loudly(folders, served, capsys):
    model = ["-m", str(folders[1])]
    with pytest.raises(SystemExit) as stopped:
        serve.main([*model, "--host", "0.0.0.0"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and not served
    assert "nnunet_sam_serve: error: --host 0.0.0.0 reaches beyond this machine, and no API key is set" in error
    assert "--api-key" in error and "--insecure-no-key" in error

    assert serve.main([*model, "--host", "0.0.0.0", "--insecure-no-key"]) == 0
    assert "WARNING: serving 0.0.0.0:1527 WITHOUT an API key" in capsys.readouterr().err
    assert serve.main([*model, "--host", "0.0.0.0", "--api-key", "k"]) == 0
    assert serve.main([*model, "--host", "::1"]) == 0  # loopback needs no key
    assert "WARNING" not in capsys.readouterr().err
    assert served == [("0.0.0.0", 1527), ("0.0.0.0", 1527), ("::1", 1527)]


# ---- 7. the Bearer scheme; /healthz answers liveness only, without a key ----------------------------------------
def test_the_key_needs_the_bearer_scheme_and_healthz_tells_only_liveness(radsam_model):
    with ThreadedServer(make_app(radsam_model, api_key="secret", max_sessions=3)) as server:
        for header in ("secret", "Basic secret", "Bearersecret", "Bearer wrong"):
            answer = httpx.post(server.url + "/claim", headers={"Authorization": header})
            assert answer.status_code == 401, header
        health = httpx.get(server.url + "/healthz")  # a load balancer sends no key
        assert health.status_code == 200 and health.json() == {"ok": True}
        assert httpx.get(server.url + "/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 401
        with nnInteractiveRemoteInferenceSession(server.url, api_key="secret") as client:
            assert client.ping()
            assert httpx.get(server.url + "/healthz").json() == {"ok": True}  # no session count
        with pytest.raises(httpx.HTTPStatusError):
            nnInteractiveRemoteInferenceSession(server.url, api_key="wrong")


# ---- 8. the upload limit holds while a chunked body streams in ---------------------------------------------------
def test_a_chunked_upload_is_stopped_at_the_limit_not_buffered(radsam_model):
    app = make_app(radsam_model, max_upload_mb=1)
    token = app.state.registry.claim()
    chunk, chunks, pulled, sent = b"\0" * 2**20, 64, [0], []

    async def receive():
        pulled[0] += 1
        return {"type": "http.request", "body": chunk, "more_body": pulled[0] < chunks}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/set_image",
        "raw_path": b"/set_image",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"transfer-encoding", b"chunked"), (LEASE_HEADER.lower().encode(), token.encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert start["status"] == 413 and "exceeds the server's limit of 1 MB" in json.loads(body)["detail"]
    assert pulled[0] <= 2, f"{pulled[0]} MiB read of a body refused at 1 MiB"

    with ThreadedServer(make_app(radsam_model, max_upload_mb=1)) as server:  # the same over a real connection
        with nnInteractiveRemoteInferenceSession(server.url) as client:
            try:
                answer = client._http.post("/set_image", content=(chunk for _ in range(chunks)))
                assert answer.status_code == 413
            except httpx.TransportError:  # the server may close the connection before the client has sent it all
                pass
            assert client.ping()


# ---- 9. every option checked; a warning for liveness >= idle; Retry-After with 503 --------------------------------
@pytest.mark.parametrize(
    "option, message",
    [
        (["--liveness-timeout", "0"], "--liveness-timeout must be a positive number, got 0"),
        (["--liveness-timeout", "-5"], "--liveness-timeout must be a positive number, got -5"),
        (["--max-upload-mb", "-1"], "--max-upload-mb must be a positive number, got -1"),
        (["--idle-timeout", "nan"], "--idle-timeout must be a positive number, got nan"),
        (["--undo-mb", "0"], "--undo-mb must be a positive number"),
        (["--port", "70000"], "--port must be 1..65535, got 70000"),
        (["-f", "abc"], "-f must be a fold number or 'all', got 'abc'"),
        (["-step_size", "0"], "-step_size must lie in (0, 1]"),
    ],
)
def test_every_option_is_checked_before_the_model_loads(tmp_path, option, message, served, capsys):
    with pytest.raises(SystemExit) as stopped:
        serve.main(["-m", str(tmp_path / "not_even_there"), *option])
    assert stopped.value.code == 2 and not served
    assert f"nnunet_sam_serve: error: {message}" in capsys.readouterr().err


def test_liveness_not_shorter_than_idle_is_warned_and_capacity_says_when_to_retry(
    folders, radsam_model, served, capsys
):
    assert serve.main(["-m", str(folders[1]), "--liveness-timeout", "60", "--idle-timeout", "60"]) == 0
    assert "warning: --liveness-timeout (60 s) is not shorter than --idle-timeout (60 s)" in capsys.readouterr().err
    with ThreadedServer(make_app(radsam_model, max_sessions=1)) as server:
        with nnInteractiveRemoteInferenceSession(server.url):
            full = httpx.post(server.url + "/claim")
            assert full.status_code == 503 and int(full.headers["Retry-After"]) > 0
            with pytest.raises(ServerAtCapacityError):
                nnInteractiveRemoteInferenceSession(server.url)


# ---- 10. without the [serve] extra: which extra to install --------------------------------------------------------
@pytest.mark.parametrize("package", ["uvicorn", "fastapi"])
def test_without_the_serve_extra_the_command_names_it(folders, package, served, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    assert serve.main(["-m", str(folders[1])]) == 2
    error = capsys.readouterr().err
    assert f"nnunet_sam_serve: error: the server needs the [serve] extra ({package} is missing)" in error
    assert 'pip install "nnunet-sam[serve]"' in error and "Traceback" not in error


# ---- 11. the undo log keeps changed boxes, within its byte budget ------------------------------------------------
def _arrays(value):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _arrays(item)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _arrays(getattr(value, f.name))


def test_the_undo_log_keeps_only_changed_boxes_within_its_budget(case, radsam_model):
    _, image, spacing, (z, y, x) = case
    clicks = [(z, y, x, True)] + [(z + dz, y + dy, x + dx, dy % 2 == 0) for dz, dy, dx in ((1, 4, 4), (0, -3, 5))] * 4
    with ThreadedServer(make_app(radsam_model)) as server, nnInteractiveRemoteInferenceSession(server.url) as client:
        buffer = _start(client, image, spacing)
        for cz, cy, cx, positive in clicks:
            client.add_point_interaction((cz, cy, cx), include_interaction=positive)
        session = server.server.config.app.state.registry.get(client._lease_token)
        volume = session.editor.segmentation.mask.shape
        arrays = list(_arrays(list(session.undo_log)))
        assert len(session.undo_log) == len(clicks)
        # the first click may segment every slice (its change spans the volume); later edits change boxes of it
        later = list(_arrays(list(session.undo_log)[1:]))
        assert not any(a.shape in (volume, buffer.shape) for a in later), "a whole volume kept per undo step"
        assert session.undo_log_bytes() == sum(a.nbytes for a in arrays)
        sizes = [session._entry_bytes(entry) for entry in session.undo_log]

    budget = sum(sizes[-3:])  # only the last steps fit: the longest run of last steps within the budget is kept
    expected = max(k for k in range(len(sizes) + 1) if sum(sizes[len(sizes) - k :]) <= budget)
    with ThreadedServer(make_app(radsam_model, undo_mb=budget / 2**20)) as server:
        with nnInteractiveRemoteInferenceSession(server.url) as client:
            buffer = _start(client, image, spacing)
            states = [buffer.copy()]
            for cz, cy, cx, positive in clicks:
                client.add_point_interaction((cz, cy, cx), include_interaction=positive)
                states.append(buffer.copy())
            session = server.server.config.app.state.registry.get(client._lease_token)
            kept = len(session.undo_log)
            assert session.undo_log_bytes() <= budget and kept == expected and 3 <= kept < len(clicks)
            for n in range(kept):  # each kept step is undone exactly; then there is nothing more to undo
                assert client.undo() is True
                np.testing.assert_array_equal(buffer, states[-2 - n])
            assert client.undo() is False


# ---- issue 29, item 3: absurd spacings refused before any resampling ----------------------------------------------
def test_absurd_spacings_are_refused_at_once(case, radsam_model):
    _, image, spacing, (z, y, x) = case
    with ThreadedServer(make_app(radsam_model, max_upload_mb=64)) as server:
        with nnInteractiveRemoteInferenceSession(server.url) as client:
            for absurd in ([30000, 10000, 10000], [3, 60, 60], [1e-6, 1e-6, 1e-6]):
                started = time.monotonic()
                _refused(lambda a=absurd: client.set_image(image, {"spacing": a}), 400, "would resample the image")
                assert time.monotonic() - started < 10
            buffer = _start(client, image, spacing)  # the session still works
            client.add_point_interaction((z, y, x), include_interaction=True)
            assert buffer.any()


# ---- issue 29, items 11 and 13: malformed bodies and headers get 400, never 500 -----------------------------------
def test_malformed_bodies_and_headers_get_400(case, radsam_model):
    _, image, spacing, (z, y, x) = case
    with ThreadedServer(make_app(radsam_model)) as server, nnInteractiveRemoteInferenceSession(server.url) as client:
        http = client._http
        meta = {META_HEADER: json.dumps({"image_properties": {"spacing": spacing}})}
        packed = pack_array(image)
        header_only = packed[: 8 + len(image.dtype.name) + 8 * image.ndim]  # no chunk count
        for body in (header_only, header_only + struct.pack("<I", 1)):
            answer = http.post("/set_image", content=body, headers=meta)
            assert answer.status_code == 400 and "cannot unpack" in answer.json()["detail"], answer.text
        nested = "[" * 5000 + "]" * 5000
        answer = http.post("/set_image", content=packed, headers={META_HEADER: nested})
        assert answer.status_code == 400 and "nested too deeply" in answer.json()["detail"], answer.text
        _start(client, image, spacing)
        answer = http.post(
            "/add_point_interaction", content=nested, headers={"Content-Type": "application/json"}
        )  # fmt: skip
        assert answer.status_code in (400, 422), answer.text
        for name in ("include_interaction", "run_prediction"):
            payload = {"coordinates": [z, y, x], "include_interaction": True, name: "false"}
            answer = http.post("/add_point_interaction", json=payload)
            assert answer.status_code == 400, answer.text
            assert f"'{name}' must be true or false" in answer.json()["detail"]
        assert not client.target_buffer.any()  # nothing was run
