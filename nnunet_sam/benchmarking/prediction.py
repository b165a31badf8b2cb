"""``nnunet_sam_benchmark_prediction``: where the time of a CPU sliding-window prediction goes.

Measures, on one phantom volume (``nnunet_sam.demo.phantoms.generate_case``, 24x96x96 voxels by default) and in one run,
tiny MaskSAM, tiny Self-Prompt-SAM (and LiteMedSAM with ``--backbones tiny lite_medsam``) next to nnU-Net's default
U-Net for the same volume:

* **Tiles and forwards** of nnU-Net's sliding window (``compute_steps_for_sliding_window``): tiles x mirrors, and
  how often every voxel is predicted per mirror. The SAM patch rule gives 4x64x64 tiles for this volume (nnU-Net's
  U-Net covers it with one 24x96x96 tile), so with nnU-Net's tile step 0.5 every slice is encoded about twice per
  mirror and tile row.
* **Per-volume seconds** of ``nnUNetPredictor.predict_sliding_window_return_logits`` with nnU-Net's settings (tile
  step 0.5, Gaussian weighting, mirroring along every axis) for each ``--threads`` setting; ``nnunet`` is what
  ``nnUNetv2_predict`` uses on a CPU (min(``nnUNet_def_n_proc``, cores) intra-op threads). The logits of every
  setting are compared with the first: largest absolute difference, and changed labels (a flip is expected only
  where the two best classes are tied within that difference, since nnU-Net sums tiles in float16). CPU seconds
  (user + system of this process) are printed next to the wall time: on a shared machine the wall time of several
  threads is inflated far more than their CPU time.
* **The cheaper choices** that change what is predicted, by their ``nnUNetv2_predict`` names: ``--disable_tta``
  (one forward per tile) and ``--disable_tta -step_size 1`` (fewer tiles), measured with the fastest thread setting.
* **Per forward** (one tile, CPU time of the calling thread, mean of ``--forwards`` after one warm-up, one
  thread): stem, image encoder with its
  additions, prompt generator, prompt encoder + mask decoder, the rest (heads, prompt extraction, reshapes); for the
  U-Net its encoder and decoder.
* **Export**: logits -> label map at the original shape (nnU-Net's ``convert_predicted_logits_to_segmentation_with_
  correct_shape``) and writing it as NIfTI.

The networks have random weights: the cost of a forward does not depend on them.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnunet_sam.training.planning import MIRROR_AXES_3D, PLANS_KEY, sliding_window_cost, window_cost_note

__all__ = [
    "nnunet_prediction_threads",
    "network_predictor",
    "benchmark_prediction",
    "format_report",
]


def nnunet_prediction_threads() -> int:
    """Intra-op threads of ``nnUNetv2_predict -device cpu``: min(``nnUNet_def_n_proc`` (8), CPU cores)."""
    from nnunetv2.configuration import default_num_processes

    return max(1, min(default_num_processes, os.cpu_count() or 1))


# ---- models -------------------------------------------------------------------------------------------------------
def _phantom_volume(shape: Sequence[int], seed: int) -> torch.Tensor:
    from nnunet_sam.demo.phantoms import generate_case

    channels, _ = generate_case(tuple(int(s) for s in shape), seed=seed)
    ct = channels[0].astype(np.float32)
    return torch.from_numpy((ct - ct.mean()) / max(float(ct.std()), 1e-6))[None]  # (1, D, H, W) z-scored


def _models(backbones: Sequence[str], shape: Sequence[int], num_classes: int) -> list[tuple[str, nn.Module, list]]:
    """(name, network, tile size) for the SAM methods on each backbone and nnU-Net's U-Net planned for ``shape``."""
    from nnunet_sam.benchmarking.configs import build_unet, sam_record, trainer_class
    from nnunet_sam.trainers.masksam import MaskSAMTrainer
    from nnunet_sam.trainers.self_prompt_sam import SelfPromptSAMTrainer

    models = []
    for backbone in backbones:
        for label, method in (("MaskSAM", MaskSAMTrainer), ("Self-Prompt-SAM", SelfPromptSAMTrainer)):
            trainer = trainer_class(method, backbone)
            record = sam_record(trainer, shape, num_classes)
            torch.manual_seed(0)
            net = trainer.build_network(record, 1, num_classes)
            models.append((f"{label} {backbone}", net, list(record["patch_size"])))
    torch.manual_seed(0)
    models.append(("nnU-Net U-Net", build_unet(list(shape), 1, num_classes), list(shape)))
    return models


def network_predictor(
    net: nn.Module,
    patch: Sequence[int],
    num_classes: int,
    step_size: float = 0.5,
    mirroring: bool = False,
    record: dict | None = None,
    name: str = "benchmark",
):
    """nnU-Net's CPU predictor (Gaussian weighting, mirroring along every axis if ``mirroring``) around a network
    in memory, for tiles of ``patch``; returns it and its plans manager (plans of :func:`plans_for_patch` with
    nnU-Net's preprocessing and export, and the record block ``record`` if given)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_sam.training.synthetic_plans import configuration_name, nnunet_preprocessing, plans_for_patch

    block = {PLANS_KEY: record} if record is not None else {}
    manager = PlansManager(plans_for_patch(patch, **nnunet_preprocessing([1.0] * len(patch)), **block))
    predictor = nnUNetPredictor(
        tile_step_size=step_size,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    labels = {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}}
    dataset_json = {"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    axes = tuple(range(len(patch))) if mirroring else None
    predictor.manual_initialization(
        net.eval(), manager, manager.get_configuration(configuration_name(patch)), None, dataset_json, name, axes
    )
    return predictor, manager


def _compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Largest logit difference, and label-map differences outside near-ties.

    nnU-Net sums the tiles in float16, so another summation order (threads) moves a logit by about one float16
    step; where the two best classes of the reference are closer than twice the largest difference, the label may
    flip without anything being wrong. ``clear_label_changes`` counts the other changed voxels (must be 0).
    """
    diff = float((logits - reference).abs().max())
    changed = logits.argmax(0) != reference.argmax(0)
    top2 = reference.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 2 * diff
    return {
        "max_abs_diff": diff,
        "max_rel_diff": diff / max(float(reference.abs().max()), 1e-12),
        "label_changes": int(changed.sum()),
        "clear_label_changes": int((changed & clear).sum()),
    }


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _parts(net: nn.Module) -> dict[str, nn.Module]:
    if hasattr(net, "encoder_additions"):  # FoldedSAM methods
        generator = getattr(net, "prompt_generator", None) or net.generator
        return {
            "stem": net.stem,
            "encoder": net.encoder_additions,
            "prompt generator": generator,
            "prompt encoder + decoder": _Both(net.sam.prompt_encoder, net.decoder_additions),
        }
    return {"encoder": net.encoder, "decoder": net.decoder}


class _Both:
    """Two modules timed as one part."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules


def forward_breakdown(net: nn.Module, patch: Sequence[int], forwards: int = 3) -> dict[str, float]:
    """CPU seconds per forward of one tile: each part (forward hooks), ``rest`` and ``total``.

    One intra-op thread, so all work runs on the calling thread and its CPU time (``time.thread_time``) does not
    grow with the load of the machine the way wall time does.
    """
    spent: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name, part in _parts(net).items():
        spent[name] = 0.0
        for module in part.modules if isinstance(part, _Both) else (part,):
            handles.append(
                module.register_forward_pre_hook(lambda *_, n=name: started.__setitem__(n, time.thread_time()))
            )
            handles.append(
                module.register_forward_hook(
                    lambda *_, n=name: spent.__setitem__(n, spent[n] + time.thread_time() - started[n])
                )
            )
    x = torch.randn(1, 1, *patch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            net.eval()(x)
            spent.update({k: 0.0 for k in spent})
            t0 = time.thread_time()
            for _ in range(forwards):
                net(x)
            total = (time.thread_time() - t0) / forwards
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    out = {k: v / forwards for k, v in spent.items()}
    out["rest"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


def _export_seconds(logits: torch.Tensor, manager, num_classes: int) -> float:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    shape = list(logits.shape[1:])
    properties = {
        "spacing": [1.0, 1.0, 1.0],
        "shape_before_cropping": shape,
        "bbox_used_for_cropping": [[0, s] for s in shape],
        "shape_after_cropping_and_before_resampling": shape,
        "sitk_stuff": {"spacing": (1.0, 1.0, 1.0), "origin": (0.0, 0.0, 0.0), "direction": tuple(np.eye(3).ravel())},
    }
    config = manager.get_configuration("3d_fullres")
    config.configuration["spacing"] = [1.0, 1.0, 1.0]
    labels = manager.get_label_manager({"labels": {"background": 0, **{f"c{i}": i for i in range(1, num_classes)}}})
    t0 = time.perf_counter()
    seg = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, manager, config, labels, properties, num_threads_torch=1
    )
    with tempfile.TemporaryDirectory() as tmp:
        SimpleITKIO().write_seg(seg, str(Path(tmp) / "case.nii.gz"), properties)
    return time.perf_counter() - t0


# ---- the benchmark ------------------------------------------------------------------------------------------------
def benchmark_prediction(
    backbones: Sequence[str] = ("tiny",),
    shape: Sequence[int] = (24, 96, 96),
    num_classes: int = 5,
    threads: Sequence[int | str] = ("nnunet", 1),
    mirroring: bool = True,
    cheaper: bool = True,
    forwards: int = 3,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every model on one phantom volume; returns a dict (``models``: one entry per model)."""
    volume = _phantom_volume(shape, seed)
    thread_counts = [nnunet_prediction_threads() if t == "nnunet" else int(t) for t in threads]
    result = {
        "volume": list(shape),
        "cpu_cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "nnunet_threads": nnunet_prediction_threads(),
        "mirroring": mirroring,
        "models": [],
    }
    old_threads = torch.get_num_threads()
    try:
        for name, net, patch in _models(backbones, shape, num_classes):
            entry = {
                "model": name,
                "patch": patch,
                "cost": asdict(sliding_window_cost(shape, patch, 0.5, MIRROR_AXES_3D if mirroring else None)),
            }
            log(f"{name}: {window_cost_note(shape, patch, MIRROR_AXES_3D if mirroring else None)}")
            entry["per_forward_s"] = forward_breakdown(net, patch, forwards)
            predictor, manager = network_predictor(net, patch, num_classes, 0.5, mirroring)
            runs, reference = [], None
            for n in thread_counts:
                torch.set_num_threads(n)
                logits, wall, cpu = _timed(lambda p=predictor: p.predict_sliding_window_return_logits(volume).float())
                row = {"threads": n, "wall_s": wall, "cpu_s": cpu}
                if reference is None:
                    reference = logits
                else:
                    row.update(_compare(logits, reference))
                runs.append(row)
                log(f"  {n} thread(s): {wall:.1f} s wall, {cpu:.1f} s CPU")
            entry["runs"] = runs
            entry["export_s"] = _export_seconds(reference, manager, num_classes)
            fastest = min(runs, key=lambda r: r["wall_s"])["threads"]
            torch.set_num_threads(fastest)
            if cheaper and (mirroring or sliding_window_cost(shape, patch, 1.0).tiles < entry["cost"]["tiles"]):
                choices = {}
                for label, step in (("--disable_tta", 0.5), ("--disable_tta -step_size 1", 1.0)):
                    if step == 1.0 and sliding_window_cost(shape, patch, 1.0).tiles == entry["cost"]["tiles"]:
                        continue  # the same tiles as nnU-Net's step
                    fast, _ = network_predictor(net, patch, num_classes, step, False)
                    _, wall, cpu = _timed(lambda p=fast: p.predict_sliding_window_return_logits(volume))
                    cost = sliding_window_cost(shape, patch, step, None)
                    choices[label] = {"forwards": cost.forwards, "wall_s": wall, "cpu_s": cpu}
                entry["cheaper"] = choices
                entry["cheaper_threads"] = fastest
            result["models"].append(entry)
    finally:
        torch.set_num_threads(old_threads)
    result["load_average_end"] = list(os.getloadavg())
    return result


def format_report(result: dict) -> str:
    """Markdown tables of a :func:`benchmark_prediction` result."""
    shape = "x".join(map(str, result["volume"]))
    lines = [
        f"Prediction of one {shape} phantom volume on the CPU ({result['cpu_cores']} cores, load average "
        f"{result['load_average'][0]:.1f} at the start, {result['load_average_end'][0]:.1f} at the end; torch "
        f"{result['torch']}); nnU-Net's settings: tile step 0.5, Gaussian weighting, "
        f"{'mirroring along all axes' if result['mirroring'] else 'no mirroring'}.",
        "",
        "| model | tile | tiles x mirrors = forwards | voxel coverage | threads | wall s | CPU s | vs first "
        "| max abs diff | changed labels (outside ties) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        c = m["cost"]
        first = m["runs"][0]["wall_s"]
        head = [m["model"], "x".join(map(str, m["patch"])), f"{c['tiles']} x {c['mirrors']} = {c['forwards']}"]
        head.append(f"{c['coverage']:.1f}")
        for i, r in enumerate(m["runs"]):
            cells = head if i == 0 else [""] * len(head)
            cells = [
                *cells,
                str(r["threads"]),
                f"{r['wall_s']:.1f}",
                f"{r['cpu_s']:.1f}",
                f"{first / r['wall_s']:.2f}x",
            ]
            cells += [
                f"{r.get('max_abs_diff', 0.0):.2g}",
                f"{r.get('label_changes', 0)} ({r.get('clear_label_changes', 0)})",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per forward of one tile (CPU ms, one thread) and export of the volume (s):", ""]
    names = []
    for m in result["models"]:
        names += [k for k in m["per_forward_s"] if k not in names]
    lines.append("| model | " + " | ".join(names) + " | export s |")
    lines.append("|---|" + "---|" * (len(names) + 1))
    for m in result["models"]:
        cells = [f"{1000 * m['per_forward_s'][k]:.0f}" if k in m["per_forward_s"] else "" for k in names]
        lines.append(f"| {m['model']} | " + " | ".join(cells) + f" | {m['export_s']:.2f} |")
    cheaper = [m for m in result["models"] if "cheaper" in m]
    if cheaper:
        lines += ["", "Cheaper choices (predict differently), with the fastest thread setting:", ""]
        lines.append("| model | nnUNetv2_predict option | threads | forwards | wall s | CPU s |")
        lines.append("|---|---|---|---|---|---|")
        for m in cheaper:
            for label, r in m["cheaper"].items():
                cells = [m["model"], f"`{label}`", str(m["cheaper_threads"]), str(r["forwards"])]
                lines.append("| " + " | ".join([*cells, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}"]) + " |")
    return "\n".join(lines)
