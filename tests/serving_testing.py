"""Test helpers for the interactive server: tiny model folders made by nnU-Net's own planner and our trainers (an
initialised network saved by the trainer, no training), and a server running in a thread on a free port."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import torch
from batchgenerators.utilities.file_and_folder_operations import save_json
from sam_testing import nnunet_env, run_tool

DATASET = 981


def make_model_folders(root: Path) -> tuple[Path, Path, Path]:
    """(raw dataset folder, RadSAM model folder, prompted 3DSAM-adapter model folder) under ``root``, made in a
    subprocess with nnU-Net's folders under ``root`` (nnU-Net reads them when imported)."""
    here = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {here!r}); import serving_testing as t; t._build({str(root)!r})"
    run_tool([sys.executable, "-c", code], nnunet_env(root, OMP_NUM_THREADS="1"))
    results = root / "results" / f"Dataset{DATASET}_Phantom"
    return (
        root / "raw" / f"Dataset{DATASET}_Phantom",
        results / "RadSAMTrainer_tiny__nnUNetPlans__2d",
        results / "SAM3DAdapterTrainer_prompted_tiny__nnUNetPlans__3d_fullres",
    )


def _build(root: str) -> None:
    """A phantom dataset fingerprinted and planned by nnU-Net's API (no preprocessing); each trainer is initialised
    on those plans and saves its checkpoint, plans.json and dataset.json as nnUNetv2_train does."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    from nnunet_sam.demo.phantoms import make_phantom_dataset

    started = time.monotonic()
    root = Path(root)
    raw = make_phantom_dataset(root / "raw", DATASET, num_train=2, num_test=2, shape=(16, 48, 48), seed=3)
    extract_fingerprints([DATASET], num_processes=1, check_dataset_integrity=False, verbose=False)
    print(f"fingerprint {time.monotonic() - started:.1f} s", flush=True)
    plan_experiments([DATASET])
    plans = json.loads((root / "preprocessed" / raw.name / "nnUNetPlans.json").read_text())
    dataset = json.loads((raw / "dataset.json").read_text())

    from nnunet_sam.trainers.radsam import RadSAMTrainer_tiny
    from nnunet_sam.trainers.sam3d_adapter import SAM3DAdapterTrainer_prompted_tiny

    for trainer_class, configuration in ((RadSAMTrainer_tiny, "2d"), (SAM3DAdapterTrainer_prompted_tiny, "3d_fullres")):
        # initialize() only looks at the file endings of the preprocessed folder (no data is loaded before training)
        data_folder = root / "preprocessed" / raw.name / plans["configurations"][configuration]["data_identifier"]
        data_folder.mkdir(parents=True, exist_ok=True)
        (data_folder / "not_preprocessed.b2nd").touch()
        torch.manual_seed(0)
        # nnUNetv2_train hands the trainer a "continue_training" flag inside the plans
        trainer = trainer_class({**plans, "continue_training": False}, configuration, 0, dataset, torch.device("cpu"))
        trainer.initialize()
        os.makedirs(trainer.output_folder, exist_ok=True)
        save_json(trainer.plans_manager.plans, os.path.join(trainer.output_folder_base, "plans.json"), sort_keys=False)
        save_json(dataset, os.path.join(trainer.output_folder_base, "dataset.json"), sort_keys=False)
        trainer.save_checkpoint(os.path.join(trainer.output_folder, "checkpoint_final.pth"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """An app served by uvicorn in a daemon thread on 127.0.0.1 (a context manager); ``url`` to connect."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
