"""Latency of ``nnunet_sam_serve`` as a viewer feels it, in one command::

    python -m nnunet_sam.serving.benchmark [--workdir DIR] [--shape 100 256 256] [--edits 20] [--threads 2]

Builds (once, in ``--workdir``) a phantom CT of ``--shape`` (z, y, x) and a RadSAM model folder of ``--trainer``
(default ``RadSAMTrainer_LiteMedSAM``: LiteMedSAM's shipped weights, initialised by the trainer as
``nnUNetv2_train`` does, not trained further), starts the server as its own process on the CPU with ``--threads``
threads, and drives it with the real ``nninteractive-client``: ``set_image``, a box around an organ on its middle
slice (LiteMedSAM's own prompt; time to first mask), then ``--edits`` correction clicks (positive and negative,
around the organ, seeded). Reports the upload time, the first mask, p50 and p95 per edit, the server's resident
memory (now and peak) and the load average of the machine before and after, as a Markdown table row and JSON.

``--server-path DIR`` runs the server from another checkout (e.g. an earlier commit), to compare two versions
side by side on the same machine and data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATASET = 983


def build(workdir: Path, shape: Sequence[int], trainer: str) -> Path:
    """The phantom dataset (2 training cases, 1 test case) and the model folder, in a subprocess with nnU-Net's
    folders under ``workdir``; returns the model folder (built once)."""
    folder = workdir / "results" / f"Dataset{DATASET}_Latency" / f"{trainer}__nnUNetPlans__2d"
    if (folder / "fold_0" / "checkpoint_final.pth").is_file():
        return folder
    env = dict(
        os.environ,
        nnUNet_raw=str(workdir / "raw"),
        nnUNet_preprocessed=str(workdir / "preprocessed"),
        nnUNet_results=str(workdir / "results"),
        nnUNet_compile="false",
    )
    command = [sys.executable, "-m", "nnunet_sam.serving.benchmark", "--build-only", "--workdir", str(workdir)]
    command += ["--shape", *map(str, shape), "--trainer", trainer]
    subprocess.run(command, env=env, check=True)
    return folder


def _build_here(workdir: Path, shape: Sequence[int], trainer_name: str) -> None:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    from nnunet_sam.demo.phantoms import make_phantom_dataset
    from nnunet_sam.trainers import radsam as trainers

    raw = make_phantom_dataset(
        workdir / "raw",
        DATASET,
        "Latency",
        num_train=2,
        num_test=1,
        shape=tuple(shape),
        spacing=(2.5, 0.8, 0.8),
        overwrite=True,
    )
    extract_fingerprints([DATASET], num_processes=1, check_dataset_integrity=False, verbose=False)
    plan_experiments([DATASET])
    plans = json.loads((workdir / "preprocessed" / raw.name / "nnUNetPlans.json").read_text())
    dataset = json.loads((raw / "dataset.json").read_text())
    data_folder = workdir / "preprocessed" / raw.name / plans["configurations"]["2d"]["data_identifier"]
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "not_preprocessed.b2nd").touch()  # initialize() only looks at the file endings
    torch.manual_seed(0)
    trainer = getattr(trainers, trainer_name)(
        {**plans, "continue_training": False}, "2d", 0, dataset, torch.device("cpu")
    )
    trainer.initialize()
    os.makedirs(trainer.output_folder, exist_ok=True)
    save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False)
    save_json(dataset, os.path.join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
    trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))


def _rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MB of a process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    model: Path,
    image_file: Path,
    label_file: Path,
    edits: int,
    threads: int,
    server_path: str | None,
    server_options: Sequence[str] = (),
    think: float = 0.0,
) -> dict:
    """Start the server, drive it, stop it; the figures as a dict."""
    import httpx
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    image, properties = SimpleITKIO().read_images([str(image_file)])
    label = SimpleITKIO().read_seg(str(label_file))[0][0]
    spacing = list(properties["spacing"])
    organ = label == 1
    zs = np.flatnonzero(organ.any((1, 2)))
    z = int(zs[len(zs) // 2])
    ys, xs = np.nonzero(organ[z])
    y, x = int(np.median(ys)), int(np.median(xs))
    box = [[z, z + 1], [int(ys.min()) - 3, int(ys.max()) + 4], [int(xs.min()) - 3, int(xs.max()) + 4]]

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if server_path:
        env["PYTHONPATH"] = os.pathsep.join([server_path, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "nnunet_sam.cli.serve", "-m", str(model), "--port", str(port), *server_options]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
            try:
                if httpx.get(url + "/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        idle_rss = _rss_mb(server.pid)[0]
        with nnInteractiveRemoteInferenceSession(url, read_timeout=3600, set_image_read_timeout=3600) as client:
            started = time.perf_counter()
            client.set_image(image, {"spacing": spacing})
            buffer = np.zeros(image.shape[1:], dtype=np.uint8)
            client.set_target_buffer(buffer)
            upload = time.perf_counter() - started
            time.sleep(think)  # the user looks at the image before the first prompt
            started = time.perf_counter()
            client.add_bbox_interaction(box, include_interaction=True)
            first = time.perf_counter() - started
            first_slices = int(buffer.any((1, 2)).sum())
            rng = np.random.default_rng(0)
            times = []
            for n in range(edits):
                dz = int(rng.integers(-(len(zs) // 3), len(zs) // 3 + 1))
                dy, dx = (int(v) for v in rng.integers(-12, 13, size=2))
                cz = int(np.clip(z + dz, 0, image.shape[1] - 1))
                started = time.perf_counter()
                client.add_point_interaction((cz, y + dy, x + dx), include_interaction=n % 2 == 0)
                times.append(time.perf_counter() - started)
        rss, peak = _rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "shape": list(image.shape[1:]),
        "threads": threads,
        "server_options": list(server_options),
        "think_s": think,
        "cpus": os.cpu_count(),
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "upload_s": round(upload, 2),
        "first_mask_s": round(first, 2),
        "first_mask_slices": first_slices,
        "edits": len(times),
        "edit_p50_s": round(float(np.percentile(times, 50)), 2) if times else None,
        "edit_p95_s": round(float(np.percentile(times, 95)), 2) if times else None,
        "edit_times_s": [round(t, 2) for t in times],
        "rss_idle_mb": round(idle_rss),
        "rss_mb": round(rss),
        "rss_peak_mb": round(peak),
    }


def table_row(label: str, result: dict) -> str:
    load = "/".join(f"{v:g}" for v in result["load_before"]) + " -> " + "/".join(f"{v:g}" for v in result["load_after"])
    return (
        f"| {label} | {result['first_mask_s']:.2f} s ({result['first_mask_slices']} slices) | "
        f"{result['edit_p50_s']:.2f} s | {result['edit_p95_s']:.2f} s | {result['rss_mb']} MB (peak "
        f"{result['rss_peak_mb']}) | {result['threads']} of {result['cpus']} CPUs, load {load} |"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_sam.serving.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="nnunet_sam_serve_benchmark", help="model and data (built once)")
    parser.add_argument("--shape", nargs=3, type=int, default=[100, 256, 256], help="phantom CT (z, y, x)")
    parser.add_argument("--trainer", default="RadSAMTrainer_LiteMedSAM", help="a RadSAM trainer class")
    parser.add_argument("--edits", type=int, default=20, help="correction clicks after the first mask")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the server")
    parser.add_argument("--server-path", help="run the server from this checkout (PYTHONPATH), for before/after")
    parser.add_argument("--encode-ahead", action="store_true", help="serve with --encode-ahead")
    parser.add_argument("--think", type=float, default=0.0, help="seconds between set_image and the first prompt")
    parser.add_argument("--label", default="this version", help="the row's name in the table")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.shape) < 16 or args.edits < 1 or args.threads < 1 or not args.think >= 0:
        parser.error("--shape needs at least 16 voxels per axis, --edits and --threads at least 1, --think >= 0")
    workdir = Path(args.workdir).resolve()
    if args.build_only:
        _build_here(workdir, args.shape, args.trainer)
        return 0
    model = build(workdir, args.shape, args.trainer)
    raw = workdir / "raw" / f"Dataset{DATASET}_Latency"
    image_file = sorted((raw / "imagesTs").glob("*.nii.gz"))[0]
    label_file = raw / "labelsTs" / image_file.name.replace("_0000", "")
    options = ["--encode-ahead"] if args.encode_ahead else []
    result = run(model, image_file, label_file, args.edits, args.threads, args.server_path, options, args.think)
    result["label"] = args.label
    print("| server | first mask | edit p50 | edit p95 | server RSS | machine |")
    print("|---|---|---|---|---|---|")
    print(table_row(args.label, result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
