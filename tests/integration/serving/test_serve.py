"""nnunet_sam_serve against the real nninteractive-client: results equal the command-line tools on the same input,
undo, changed regions, sessions and leases, bad inputs, memory over 50 interactions, SIGTERM.

The model folders hold initialised (untrained) tiny networks saved by our trainers: equality with the commands
does not need a trained model, and each test checks that the masks compared are neither empty nor the whole image.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from serving_testing import ThreadedServer, free_port

pytest.importorskip("fastapi")
from nnInteractive.inference.remote import (  # noqa: E402
    ServerAtCapacityError,
    SessionExpiredError,
    nnInteractiveRemoteInferenceSession,
)
from nnInteractive.inference.remote._protocol import META_HEADER  # noqa: E402
from nnInteractive.inference.remote.serialization import pack_array  # noqa: E402

from nnunet_sam.cli import (  # noqa: E402
    predict_prompted,
    segment_radsam,
    serve,  # noqa: E402
)
from nnunet_sam.inference import radsam
from nnunet_sam.serving.app import make_app  # noqa: E402
from nnunet_sam.serving.editors import load_model  # noqa: E402


@pytest.fixture(scope="module")
def radsam_server(radsam_model):
    with ThreadedServer(make_app(radsam_model, max_sessions=2, api_key="secret", max_upload_mb=4)) as server:
        yield server


def _connect(server, key: str | None = "secret") -> nnInteractiveRemoteInferenceSession:
    return nnInteractiveRemoteInferenceSession(server.url, api_key=key)


def _start(client, image: np.ndarray, spacing) -> np.ndarray:
    client.set_image(image, {"spacing": spacing})
    buffer = np.zeros(image.shape[1:], dtype=np.uint8)
    client.set_target_buffer(buffer)
    return buffer


def _radsam_command(tmp: Path, folder: Path, image_file: Path, spec: dict, start: np.ndarray | None = None):
    """nnunet_sam_segment_radsam on the same image and prompt -> its mask (Z, Y, X)."""
    prompt = tmp / "prompt.json"
    prompt.write_text(json.dumps(spec))
    out = tmp / "out.nii.gz"
    argv = ["-i", str(image_file), "-o", str(out), "-m", str(folder), "--prompt", str(prompt)]
    if start is not None:
        _, properties = SimpleITKIO().read_images([str(image_file)])
        SimpleITKIO().write_seg(start.astype(np.uint8), str(tmp / "start.nii.gz"), properties)
        argv += ["--start", str(tmp / "start.nii.gz")]
    assert segment_radsam.main(argv) == 0
    return SimpleITKIO().read_seg(str(out))[0][0]


def _covers(box, before: np.ndarray, after: np.ndarray) -> None:
    """Every voxel that changed lies inside the answered box."""
    changed = before != after
    if box is None:
        assert not changed.any()
        return
    outside = changed.copy()
    outside[tuple(slice(lo, hi) for lo, hi in box)] = False
    assert not outside.any(), f"changed voxels outside the answered box {box}"


def _nontrivial(mask: np.ndarray) -> None:
    assert 0 < mask.sum() < mask.size, "the compared mask is empty or full: the comparison would prove nothing"


# ---- 1. RadSAM: click, correction, undo, initial segmentation ---------------------------------------------------
def test_radsam_results_equal_the_command_and_the_api(tmp_path, folders, case, radsam_model, radsam_server):
    image_file, image, spacing, (z, y, x) = case
    last = image.shape[1] - 1
    # the same steps through the Python API, on the image as nnunet_sam_segment_radsam reads it
    model = radsam_model.model
    data, _, properties = model.preprocess(*SimpleITKIO().read_images([str(image_file)]))
    grid = radsam.Geometry(properties, data.shape[1:])
    slices = radsam.SliceModel(model.network, data)
    with _connect(radsam_server) as client:
        assert client.supported_interactions["points"] and client.supported_interactions["bbox3d"]
        assert client.supports_undo and client.supports_initial_label
        buffer = _start(client, image, spacing)

        before = buffer.copy()
        box = client.add_point_interaction((z, y, x), include_interaction=True)
        _covers(box, before, buffer)
        spec = {"kind": "point", "slice": z, "point": [y, x], "boundaries": [0, last]}
        expected = _radsam_command(tmp_path, folders[1], image_file, spec)
        _nontrivial(expected)
        np.testing.assert_array_equal(buffer, expected)
        prompt = radsam.Prompt("point", grid.slice(z), point=grid.inplane(y, x))
        segmentation = radsam.segment_from_prompt(slices, prompt, (grid.slice(0), grid.slice(last)))
        np.testing.assert_array_equal(buffer, model.to_original(segmentation.mask, properties))

        steps = [buffer.copy()]
        for dz, dy, dx, positive in ((1, 4, 4, True), (0, -3, 5, False), (-2, 0, 0, False)):
            cz, cy, cx = z + dz, y + dy, x + dx
            box = client.add_point_interaction((cz, cy, cx), include_interaction=positive)
            _covers(box, steps[-1], buffer)
            correction = radsam.Correction(grid.slice(cz), *grid.inplane(cy, cx), positive)
            segmentation = radsam.edit(slices, segmentation, [correction])
            np.testing.assert_array_equal(buffer, model.to_original(segmentation.mask, properties))
            steps.append(buffer.copy())
        assert any((s != steps[0]).any() for s in steps[1:]), "no correction changed the mask: nothing was shown"

        while len(steps) > 1:  # undo restores each earlier mask exactly
            steps.pop()
            assert client.undo() is True
            np.testing.assert_array_equal(buffer, steps[-1])
        assert client.undo() is True and not client.undo()
        np.testing.assert_array_equal(buffer, 0)

        # start from a mask (e.g. another model's prediction), then correct it
        initial = np.zeros_like(buffer)
        initial[z - 1 : z + 2, y - 6 : y + 6, x - 6 : x + 6] = 1
        client.add_initial_seg_interaction(initial)
        np.testing.assert_array_equal(buffer, initial)
        before = buffer.copy()
        box = client.add_point_interaction((z, y + 2, x + 2), include_interaction=False)
        _covers(box, before, buffer)
        spec = {"boundaries": [0, last], "corrections": [{"slice": z, "point": [y + 2, x + 2], "positive": False}]}
        expected = _radsam_command(tmp_path, folders[1], image_file, spec, start=initial)
        _nontrivial(expected)
        np.testing.assert_array_equal(buffer, expected)
        assert client.undo() is True
        np.testing.assert_array_equal(buffer, initial)


# ---- 2. prompted 3DSAM-adapter ---------------------------------------------------------------------------------
def test_prompted_results_equal_the_command(tmp_path, folders, case):
    image_file, image, spacing, (z, y, x) = case
    model = load_model(str(folders[2]), mirroring=False)
    clicks = [((z, y, x), True), ((z + 1, y + 5, x - 4), False)]
    (tmp_path / "in").mkdir()
    os.symlink(image_file, tmp_path / "in" / "case_0000.nii.gz")
    with ThreadedServer(make_app(model)) as server, _connect(server, None) as client:
        assert client.supported_interactions == {
            "points": True, "bbox2d": True, "bbox3d": True, "scribble": False, "lasso": False
        }  # fmt: skip
        buffer = _start(client, image, spacing)
        for n, (click, positive) in enumerate(clicks, 1):
            before = buffer.copy()
            box = client.add_point_interaction(click, include_interaction=positive)
            _covers(box, before, buffer)
            points = [{"position": list(c), "label": 1 if p else 0} for c, p in clicks[:n]]
            (tmp_path / "points.json").write_text(json.dumps({"points": {"case": points}}))
            argv = [
                "-i",
                str(tmp_path / "in"),
                "-o",
                str(tmp_path / f"out{n}"),
                "-points",
                str(tmp_path / "points.json"),
            ]
            argv += ["-m", str(folders[2]), "-f", "0", "-device", "cpu", "--disable_tta"]
            assert predict_prompted.main(argv) == 0
            expected = SimpleITKIO().read_seg(str(tmp_path / f"out{n}" / "case.nii.gz"))[0][0] == 1
            _nontrivial(expected)
            np.testing.assert_array_equal(buffer, expected)
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.add_scribble_interaction(np.ones(buffer.shape, np.uint8), include_interaction=True)
        assert refused.value.response.status_code == 400
        assert "Interaction 'scribble' is not supported" in refused.value.response.json()["detail"]


# ---- 3. sessions, capacity, leases, API key ---------------------------------------------------------------------
def test_sessions_are_separate_capacity_expiry_and_api_key(case, radsam_model, radsam_server):
    _, image, spacing, (z, y, x) = case
    with _connect(radsam_server) as first, _connect(radsam_server) as second:
        a, b = _start(first, image, spacing), _start(second, image, spacing)
        first.add_point_interaction((z, y, x), include_interaction=True)
        _nontrivial(a)
        np.testing.assert_array_equal(b, 0)
        alone = a.copy()
        first.undo()
        # both at once: the model's work is serialised, each session gets what it would get alone
        clicks = [threading.Thread(target=c.add_point_interaction, args=((z, y, x), True)) for c in (first, second)]
        for thread in clicks:
            thread.start()
        for thread in clicks:
            thread.join()
        np.testing.assert_array_equal(a, alone)
        np.testing.assert_array_equal(b, alone)
        second.add_point_interaction((z, y - 3, x + 3), include_interaction=False)
        assert second.undo() and second.undo() and not second.undo()  # the second session's two steps only
        assert first.undo() and (a == 0).all()
        with pytest.raises(ServerAtCapacityError, match="at capacity \\(2 sessions\\)"):
            _connect(radsam_server)
    with pytest.raises(httpx.HTTPStatusError) as refused:
        _connect(radsam_server, key="wrong")
    assert refused.value.response.status_code == 401 and "API key" in refused.value.response.json()["detail"]
    with pytest.raises(httpx.HTTPStatusError):
        _connect(radsam_server, key=None)

    with ThreadedServer(make_app(radsam_model, idle_timeout=1.0, sweep_interval=60)) as short:
        client = _connect(short, None)
        assert client.lease_status()["remaining_seconds"] <= 1.0
        time.sleep(1.3)
        with pytest.raises(SessionExpiredError, match="expired \\(idle for more than 1 s\\)"):
            client.set_image(image, {"spacing": spacing})
        client.close()


# ---- 4. bad inputs: a clear answer each, and the session still works ---------------------------------------------
def test_bad_inputs_get_clear_errors_and_leave_the_session_usable(case, radsam_server):
    _, image, spacing, (z, y, x) = case
    shape = image.shape[1:]
    with _connect(radsam_server) as client:

        def refused(call, status: int, message: str) -> None:
            with pytest.raises(httpx.HTTPStatusError) as error:
                call()
            assert error.value.response.status_code == status, error.value.response.text
            assert message in error.value.response.json()["detail"]

        refused(lambda: client.add_point_interaction((z, y, x), True), 400, "call set_image first")
        buffer = _start(client, image, spacing)
        refused(lambda: client.add_point_interaction((z, shape[1] + 3, x), True), 400, "lies outside the image")
        refused(lambda: client.add_point_interaction((z, math.nan, x), True), 400, "must be finite numbers")
        refused(lambda: client.add_point_interaction((z, y), True), 400, "must be 3 numbers")
        refused(lambda: client.add_bbox_interaction([[z, z], [y - 3, y + 3], [x - 3, x + 3]], True), 400, "zero size")
        refused(
            lambda: client.add_bbox_interaction([[z - 1, z + 2], [y - 3, y + 3], [x - 3, x + 3]], False),
            400,
            "a negative box needs a mask to correct",
        )
        refused(lambda: client.add_point_interaction((z, y, x), False), 400, "a negative click needs a mask")
        refused(lambda: client.set_target_buffer(np.zeros((3, 3, 3), np.uint8)), 400, "target buffer has shape")
        client.set_target_buffer(buffer)
        refused(lambda: client.set_image(np.stack([image[0]] * 2), {"spacing": spacing}), 400, "1 channel(s)")
        refused(lambda: client.set_image(image, {"spacing": [1.0, -1.0, 1.0]}), 400, "must be positive")
        bad = image.astype(np.float32)
        bad[0, 0, 0, 0] = np.nan
        refused(lambda: client.set_image(bad, {"spacing": spacing}), 400, "non-finite voxels")
        http = client._http

        def raw(path, array, status, message):
            meta = {META_HEADER: json.dumps({"image_properties": {"spacing": spacing}})}
            response = http.post(path, content=pack_array(array), headers=meta)
            assert response.status_code == status and message in response.json()["detail"], response.text

        raw("/set_image", image[0], 400, "must be 4D")  # the client itself refuses this, so it goes raw
        as_string = http.post("/add_point_interaction", json={"coordinates": [z, y, x], "include_interaction": "false"})
        assert as_string.status_code == 400, as_string.text  # was taken as a positive click (issue 29 item 11)
        assert "'include_interaction' must be true or false (JSON booleans), got 'false'" in as_string.json()["detail"]
        raw("/set_image", np.zeros((1, 200, 200, 200), np.float32), 413, "over the server's limit of 4 MB")
        big = http.post("/set_image", content=os.urandom(5 * 2**20))
        assert big.status_code == 413 and "exceeds the server's limit of 4 MB" in big.json()["detail"]
        assert http.post("/undo").status_code == 200  # nothing to undo is not an error

        # after every refusal: the same session segments, and the box works as a prompt
        box = client.add_bbox_interaction([[z, z + 1], [y - 5, y + 5], [x - 5, x + 5]], include_interaction=True)
        assert box is not None and buffer.any()
        scribble = np.zeros(shape, np.uint8)
        scribble[z, y - 2 : y + 3, x] = 1
        client.add_scribble_interaction(scribble, include_interaction=True)

    expired = _connect(radsam_server)
    expired._http.post("/release")
    with pytest.raises(SessionExpiredError, match="unknown or has expired"):
        expired.set_image(image, {"spacing": spacing})
    expired.close()


def test_command_refuses_unusable_model_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        serve.main(["-m", str(tmp_path / "missing")])
    assert stopped.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stopped:
        serve.main(["-m", str(tmp_path)])
    assert stopped.value.code == 2 and "is not an nnU-Net model folder (no dataset.json)" in capsys.readouterr().err
    (tmp_path / "dataset.json").write_text("{}")
    (tmp_path / "plans.json").write_text("{}")
    assert serve.main(["-m", str(tmp_path)]) == 2  # no checkpoint: refused before serving
    assert "error:" in capsys.readouterr().err


# ---- 5. memory over 50 interactions, clean SIGTERM ---------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_fifty_interactions_keep_memory_bounded_and_sigterm_stops_cleanly(folders, case):
    _, image, spacing, (z, y, x) = case
    port = free_port()
    command = [sys.executable, "-m", "nnunet_sam.cli.serve", "-m", str(folders[1]), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        with nnInteractiveRemoteInferenceSession(url) as client:
            buffer = _start(client, image, spacing)
            rng = np.random.default_rng(0)

            def interaction(n: int) -> None:
                """Mostly correction clicks; a reset and a new first click every 10th, an undo every 7th."""
                if n % 10 == 0:
                    client.reset_interactions()
                    client.add_point_interaction((z, y, x), include_interaction=True)
                elif n % 7 == 0:
                    client.undo()
                else:
                    dz, dy, dx = rng.integers(-2, 3), rng.integers(-6, 7), rng.integers(-6, 7)
                    # positive after an undo (which may have removed the only mask), else alternating
                    positive = n % 2 == 1 or (n - 1) % 7 == 0
                    client.add_point_interaction((z + dz, y + dy, x + dx), include_interaction=positive)

            for n in range(10):  # warm-up: embeddings cached, undo log filled
                interaction(n)
            before = _rss_mb(server.pid)
            for n in range(10, 60):
                interaction(n)
            after = _rss_mb(server.pid)
            assert buffer.any()
        print(f"server RSS before / after 50 interactions: {before:.1f} / {after:.1f} MB")
        assert after - before < 50, f"RSS grew by {after - before:.1f} MB over 50 interactions (bound 50 MB)"
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        assert server.returncode == 0, output
        assert "server stopped" in output
    finally:
        if server.poll() is None:
            server.kill()
