"""``nnunet_sam_serve``: serve a trained RadSAM or prompted 3DSAM-adapter model over nnInteractive's remote
protocol, for napari-nninteractive (remote mode), the 3D Slicer extension or any ``nninteractive-client`` user.

The server (:mod:`nnunet_sam.serving`) loads the model once and listens on loopback unless ``--host`` says
otherwise; SIGTERM or Ctrl-C stops it cleanly (open requests finish, sessions are dropped).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Sequence

from nnunet_sam.cli import conventions

COMMAND = "nnunet_sam_serve"

API_KEY_VARIABLE = "NNUNET_SAM_SERVE_API_KEY"


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
    parser.add_argument("--port", type=int, default=1527, help="port (default 1527)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_VARIABLE),
        help=f"require this bearer token from clients (default: ${API_KEY_VARIABLE}, else none)",
    )
    parser.add_argument("--max-sessions", type=int, default=4, help="clients served at once (default 4)")
    parser.add_argument("--idle-timeout", type=float, default=600.0, help="seconds a session may idle (default 600)")
    parser.add_argument(
        "--liveness-timeout", type=float, default=60.0, help="seconds without any request, heartbeats included, "
        "before a session counts as gone (default 60)"
    )  # fmt: skip
    parser.add_argument("--max-upload-mb", type=float, default=2048.0, help="largest upload, packed or unpacked")
    parser.add_argument("--label", type=int, help="prompted 3DSAM-adapter: class served (default: the first)")
    parser.add_argument("-step_size", type=float, default=0.5, help="prompted 3DSAM-adapter: sliding window step")
    parser.add_argument("--disable_tta", action="store_true", help="prompted 3DSAM-adapter: no mirroring")
    parser.add_argument(
        "--dicom-root",
        help="let clients save their result as a DICOM SEG of a series below this folder (POST "
        "/nnunet_sam/save_dicom_seg; needs the extra nnunet-sam[dicom]; see docs/dicom.md)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isdir(args.m):
        parser.exit(2, f"error: the model folder {args.m} does not exist\n")
    from nnunet_sam.inference.model_folder import ModelFolderError, check_model_folder

    try:
        check_model_folder(args.m)
    except ModelFolderError as error:
        parser.exit(2, f"error: {error}\n")
    for name, value in (("--max-sessions", args.max_sessions), ("--idle-timeout", args.idle_timeout)):
        if value <= 0:
            parser.exit(2, f"error: {name} must be positive, got {value}\n")
    if args.dicom_root:
        from nnunet_sam.inference.dicom import DicomError, require

        if not os.path.isdir(args.dicom_root):
            parser.exit(2, f"error: --dicom-root {args.dicom_root} is not a folder\n")
        try:
            require("--dicom-root")
        except DicomError as error:
            parser.exit(2, f"error: {error}\n")
    import uvicorn

    from nnunet_sam.serving.app import make_app
    from nnunet_sam.serving.editors import load_model

    try:
        model = load_model(
            args.m, args.f if args.f == "all" else int(args.f), args.chk, args.device, args.label,
            args.step_size, not args.disable_tta,
        )  # fmt: skip
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
