"""``nnunet_sam_serve``: serve a trained RadSAM or prompted 3DSAM-adapter model over nnInteractive's remote
protocol, for napari-nninteractive (remote mode), the 3D Slicer extension or any ``nninteractive-client`` user.

The server (:mod:`nnunet_sam.serving`) loads the model once and listens on loopback unless ``--host`` says
otherwise; beyond loopback it needs an API key (``--api-key`` or ``$NNUNET_SAM_SERVE_API_KEY``), or
``--insecure-no-key`` to let anyone who can reach the port in. Every option is checked before the model loads.
SIGTERM or Ctrl-C stops it cleanly (open requests finish, sessions are dropped).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import math
import os
import signal
import sys
from collections.abc import Sequence

from nnunet_sam.cli import conventions

COMMAND = "nnunet_sam_serve"

API_KEY_VARIABLE = "NNUNET_SAM_SERVE_API_KEY"

SERVE_EXTRA = 'pip install "nnunet-sam[serve]"'


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine only (127.0.0.0/8, ::1, localhost); 0.0.0.0, :: and names are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def available_cpus() -> int:
    """CPUs this process may run on (its affinity; all of the machine's where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunet_sam_serve",
        description="Serve a RadSAM or prompted 3DSAM-adapter model folder over nnInteractive's remote protocol "
        "(nninteractive-client's nnInteractiveRemoteInferenceSession, napari-nninteractive in remote mode).",
    )
    parser.add_argument("-m", required=True, help="model folder (nnUNet_results/DATASET/TRAINER__PLANS__CONFIG)")
    parser.add_argument("-f", default="0", help="fold (default 0; or 'all')")
    parser.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name")
    parser.add_argument("-device", default="cpu", choices=["cpu", "cuda", "mps"], help="device (default cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=1527, help="port, 1-65535 (default 1527)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"require 'Authorization: Bearer KEY' from clients (default: ${API_KEY_VARIABLE}, else none: then only "
        "loopback is served)",
    )
    parser.add_argument(
        "--insecure-no-key",
        action="store_true",
        help="serve a non-loopback --host without an API key: anyone who can reach the port may upload images and "
        "use the model",
    )
    parser.add_argument("--max-sessions", type=int, default=4, help="clients served at once (default 4)")
    parser.add_argument("--idle-timeout", type=float, default=600.0, help="seconds a session may idle (default 600)")
    parser.add_argument(
        "--liveness-timeout", type=float, default=60.0, help="seconds without any request, heartbeats included, "
        "before a session counts as gone (default 60)"
    )  # fmt: skip
    parser.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest upload, packed or unpacked")
    parser.add_argument(
        "--undo-mb", type=float, default=64.0, help="memory of one session's undo log, oldest steps dropped first"
    )
    parser.add_argument(
        "--encode-ahead",
        action="store_true",
        help="RadSAM: encode every slice in the background after an image arrives (faster first mask and edits "
        "once done; costs CPU/GPU time and the embeddings' memory for every slice)",
    )
    parser.add_argument(
        "--prediction-cache-mb",
        type=float,
        default=16.0,
        help="RadSAM: memory per session for slice masks kept by their exact prompts, so an edit decodes only the "
        "slices whose prompts changed (default 16; 0: off; results are the same either way)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads of the network (default: the CPUs this process may run on, which torch's own default, "
        "the machine's cores, ignores in a container or under taskset)",
    )
    parser.add_argument("--label", type=int, help="prompted 3DSAM-adapter: class served (default: the first)")
    parser.add_argument("-step_size", type=float, default=0.5, help="prompted 3DSAM-adapter: sliding window step")
    parser.add_argument("--disable_tta", action="store_true", help="prompted 3DSAM-adapter: no mirroring")
    parser.add_argument(
        "--dicom-root",
        help="let clients save their result as a DICOM SEG of a series below this folder (POST "
        "/nnunet_sam/save_dicom_seg; needs the extra nnunet-sam[dicom]; see docs/dicom.md)",
    )
    return parser


def check_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) every option value the server cannot work with, before anything is loaded; warn on risky ones."""
    if args.f != "all":
        try:
            args.f = int(args.f)
        except ValueError:
            parser.error(f"-f must be a fold number or 'all', got {args.f!r}")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be 1..65535, got {args.port}")
    positive = {
        "--max-sessions": args.max_sessions,
        "--idle-timeout": args.idle_timeout,
        "--liveness-timeout": args.liveness_timeout,
        "--max-upload-mb": args.max_upload_mb,
        "--undo-mb": args.undo_mb,
    }
    for name, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{name} must be a positive number, got {value:g}")
    if not (math.isfinite(args.prediction_cache_mb) and args.prediction_cache_mb >= 0):
        parser.error(f"--prediction-cache-mb must be 0 (off) or a positive number, got {args.prediction_cache_mb:g}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if not 0 < args.step_size <= 1:
        parser.error(f"-step_size must lie in (0, 1], got {args.step_size:g}")
    if args.liveness_timeout >= args.idle_timeout:
        print(
            f"{COMMAND}: warning: --liveness-timeout ({args.liveness_timeout:g} s) is not shorter than --idle-timeout "
            f"({args.idle_timeout:g} s): a client that vanished holds its session until the idle timeout",
            file=sys.stderr,
            flush=True,
        )
    if not args.api_key and not is_loopback(args.host):
        if not args.insecure_no_key:
            parser.error(
                f"--host {args.host} reaches beyond this machine, and no API key is set: give --api-key KEY (or "
                f"${API_KEY_VARIABLE}) and the same key to the clients, or --insecure-no-key to let anyone in"
            )
        print(
            f"{COMMAND}: WARNING: serving {args.host}:{args.port} WITHOUT an API key (--insecure-no-key): anyone who "
            "can reach this port can upload images and use the model",
            file=sys.stderr,
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_options(parser, args)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as error:
        missing = f"the server needs the [serve] extra ({error.name} is missing)"
        return conventions.error(COMMAND, f"{missing}: {SERVE_EXTRA}")
    if not os.path.isdir(args.m):
        parser.error(f"the model folder {args.m} does not exist")
    from nnunet_sam.inference.model_folder import ModelFolderError, check_model_folder

    try:
        check_model_folder(args.m)
    except ModelFolderError as error:
        parser.error(str(error))
    if args.dicom_root:
        from nnunet_sam.inference.dicom import DicomError, require

        if not os.path.isdir(args.dicom_root):
            parser.error(f"--dicom-root {args.dicom_root} is not a folder")
        try:
            require("--dicom-root")
        except DicomError as error:
            parser.error(str(error))

    import torch

    from nnunet_sam.serving.app import make_app
    from nnunet_sam.serving.editors import load_model

    torch.set_num_threads(args.threads or available_cpus())
    try:
        model = load_model(
            args.m,
            args.f,
            args.chk,
            args.device,
            args.label,
            args.step_size,
            not args.disable_tta,
            args.encode_ahead,
            args.prediction_cache_mb,
        )
    except (ValueError, FileNotFoundError) as error:
        return conventions.error(COMMAND, error)
    gc.freeze()  # the model lives until exit: keep its many objects out of every collection, the last one included
    app = make_app(
        model,
        max_sessions=args.max_sessions,
        idle_timeout=args.idle_timeout,
        liveness_timeout=args.liveness_timeout,
        api_key=args.api_key or None,
        max_upload_mb=args.max_upload_mb,
        undo_mb=args.undo_mb,
    )
    if args.dicom_root:
        from nnunet_sam.inference.dicom import Algorithm
        from nnunet_sam.serving.dicom_export import add_save_route

        fold = args.f if args.f == "all" else int(args.f)
        add_save_route(app, args.dicom_root, args.api_key or None, Algorithm.of_model_folder(args.m, [fold]))
    print(f"serving {model.kind} from {args.m} on http://{args.host}:{args.port}", flush=True)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal under the handler it found: with
    # this one, that ends uvicorn.run instead of killing the process, so the command exits with 0
    for stop in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
