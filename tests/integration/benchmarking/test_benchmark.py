"""nnunet_sam_benchmark: a small run's JSON is complete and sane; the counting helpers match hand computation."""

from __future__ import annotations

import json
import math
import os

import numpy
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.benchmarking import configs, counting, timing
from nnunet_sam.cli import benchmark
from nnunet_sam.training import memory_estimate

SMALL = [
    "--trainers", "MaskSAMTrainer", "SelfPromptSAMTrainer",
    "--backbones", "tiny", "vit_b",
    "--cpu-backbones", "tiny",
    "--runs", "1", "--warmup", "0",
    "--input-sizes", "256",
    "--volume-scales", "1",
    "--no-autocast",
    "--presets",
    "--attention-sizes",
]  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("benchmark") / "report.json"
    returned = benchmark.run([*SMALL, "--json", str(path)])
    with open(path, encoding="utf-8") as f:
        written = json.load(f)
    assert written == json.loads(json.dumps(returned)), "the JSON file holds exactly the returned report"
    return written


def _config(report: dict, trainer: str, backbone: str) -> dict:
    (found,) = [c for c in report["configs"] if c["trainer"] == trainer and c["backbone"] == backbone]
    return found


def test_every_requested_configuration_is_reported(report):
    assert report["failed"] == {}
    assert {(c["trainer"], c["backbone"]) for c in report["configs"]} == {
        (t, b) for t in ("MaskSAMTrainer", "SelfPromptSAMTrainer") for b in ("tiny", "vit_b")
    }
    assert sorted(report["unet"]) == ["4x64x64", "8x224x224"], "U-Net at each SAM patch"
    assert _config(report, "MaskSAMTrainer", "vit_b")["patch_size"] == [8, 224, 224]  # planned [64, 192, 160]
    assert report["run"]["wall_s"] > 0 and report["setup"]["method"]


@pytest.mark.parametrize("trainer", ["MaskSAMTrainer", "SelfPromptSAMTrainer"])
@pytest.mark.parametrize("backbone", ["tiny", "vit_b"])
def test_flops_are_sane(report, trainer, backbone):
    f = _config(report, trainer, backbone)["flops"]
    assert f["train_step"] > f["inference"] > 0
    assert f["train_step_checkpointed"] > f["train_step"], "checkpointing recomputes the encoder blocks"
    assert 2.0 < f["frozen_encoder_floor"] < 2.3
    # the real step can only add the trainable weights' gradient work to the all-frozen step, and stays below 3
    assert f["frozen_encoder_floor"] * 0.95 < f["all_frozen_floor"] <= f["train_over_forward"] < 3.05
    if backbone == "vit_b":  # frozen ViT-B dominates: near the floor, far from full fine-tuning (3)
        assert f["ratio_over_floor"] < 1.15, f"{trainer} vit_b training step is {f['ratio_over_floor']:.2f}x the floor"
    if trainer == "SelfPromptSAMTrainer":
        assert f["train_step_stage1"] < f["train_step"], "stage 1 skips SAM's decoder"
    assert _config(report, trainer, backbone)["frozen_params_with_grad"] == 0


@pytest.mark.parametrize("trainer", ["MaskSAMTrainer", "SelfPromptSAMTrainer"])
@pytest.mark.parametrize("backbone", ["tiny", "vit_b"])
def test_parameter_counts_match_the_modules(report, trainer, backbone):
    c = _config(report, trainer, backbone)
    trainer_class = configs.trainer_class(configs.METHODS[trainer], backbone)
    block = {k: c[k] for k in ("patch_size", "sam_input_size", "num_queries")} | {"backbone": backbone}
    record = trainer_class.new_record(block).to_block()  # as a new training saves it (the trainer's options)
    net = configs.on_meta(lambda: configs.build_sam_network(trainer_class, record, 1, 14))
    additions = sum(p.numel() for name, m in net.named_children() if name != "sam" for p in m.parameters())
    sam = configs.on_meta(lambda: build_sam(get_backbone(backbone), c["sam_input_size"]))
    p = c["params"]
    assert p["trainable"] == additions, "trainable = everything outside SAM (what the optimiser gets)"
    assert p["frozen"] == sum(q.numel() for q in sam.parameters()), "frozen = the stock SAM"
    assert p["total"] == p["trainable"] + p["frozen"]
    ckpt = c["checkpoint_bytes"]
    assert 4 * p["total"] <= ckpt["full_state_dict"] < 1.01 * 4 * p["total"], "fp32 weights + a few buffers"
    assert ckpt["optimizer_state"] == 4 * p["trainable"] * memory_estimate.OPTIMIZER_STATE[c["optimizer"]]
    assert 4 * p["trainable"] <= ckpt["trainable_only"] < ckpt["full_state_dict"]


def test_memory_estimates_are_consistent(report):
    for c in report["configs"]:
        p, buffers = c["params"], memory_estimate.OPTIMIZER_STATE[c["optimizer"]]
        one, two = c["memory_bytes"]["batch1"], c["memory_bytes"]["batch2"]
        for row in (one, two):
            assert row["none"] == 4 * p["total"] + 4 * (1 + buffers) * p["trainable"] + row["activations_fp32"]
            assert row["checkpointing"] < row["none"], f"{c['trainer']} {c['backbone']}: checkpointing saves nothing"
        assert 1.8 < two["activations_fp32"] / one["activations_fp32"] < 2.1, "activations grow with the batch"
    vit_b = _config(report, "MaskSAMTrainer", "vit_b")["memory_bytes"]["batch2"]
    assert 1 * 2**30 < vit_b["activations_fp32"] < 10 * 2**30  # 16 slices at 224 px (DESIGN: 16.3 GiB at 512 px)
    target = report["target"]
    assert target["option_set"] in vit_b and target["bytes"] == vit_b[target["option_set"]]
    assert target["fits"] == (target["bytes"] <= 24 * 2**30)


def test_unet_reference(report):
    for u in report["unet"].values():
        assert u["params"]["frozen"] == 0
        assert 2.9 < u["flops"]["train_over_forward"] < 3.1, "a fully trained network costs about 3 forwards"


def test_cpu_timings(report):
    assert {(r["trainer"], r["backbone"]) for r in report["cpu"]} == {
        ("MaskSAMTrainer", "tiny"),
        ("SelfPromptSAMTrainer", "tiny"),
    }
    for r in report["cpu"]:
        assert r["patch_size"] == [4, 64, 64]  # derived from the planned CPU patch [8, 64, 64]
        assert r["sam"]["train_step_s"] > r["sam"]["inference_patch_s"] > 0
        assert r["train_ratio_to_unet"] == pytest.approx(r["sam"]["train_step_s"] / r["unet"]["train_step_s"])
    (row,) = report["volume_scaling"]
    assert row["shape"] == [4, 128, 128] and row["tiles"] == 9  # 1 x 3 x 3 tiles of 4x64x64 at step 0.5


@pytest.mark.slow
def test_sliding_window_cost_grows_with_the_tiles():
    trainer = configs.trainer_class(configs.METHODS["MaskSAMTrainer"], "tiny")
    record = configs.sam_record(trainer, [8, 64, 64], 4)
    one, two = timing.sliding_window_times(trainer, record, 1, 4, [1, 2])
    assert math.prod(two["shape"]) == 2 * math.prod(one["shape"])
    for row in (one, two):
        steps = compute_steps_for_sliding_window(row["shape"], record["patch_size"], 0.5)
        assert row["tiles"] == math.prod(len(s) for s in steps)
    assert two["tiles"] > one["tiles"] and two["seconds"] > one["seconds"]


def test_input_size_options(report):
    (row,) = report["input_sizes"]
    assert (row["sam_input_size"], row["token_grid"], row["window_padded_grid"]) == (256, 16, 28)
    assert row["window_padding_waste"] == pytest.approx(1 - 16**2 / 28**2)
    assert 68e9 < row["encoder_flops_per_slice"] < 70e9, "DESIGN.md section 10: ViT-B forward at 256 px = 69 GFLOPs"


def test_grouped_conv_backward_is_counted_per_group():
    b, c, d, h, w = 2, 8, 4, 5, 5
    conv = torch.nn.Conv3d(c, c, 3, padding=1, groups=c, bias=False).to("meta")
    x = torch.zeros(b, c, d, h, w, device="meta", requires_grad=True)
    forward = 2 * b * c * d * h * w * 27  # one multiply-add per output voxel and kernel tap, per channel
    assert counting.count_flops(lambda: conv(x)) == forward
    assert counting.count_flops(lambda: conv(x).sum().backward()) == 3 * forward  # + input grad + weight grad
    conv.requires_grad_(False)
    assert counting.count_flops(lambda: conv(x).sum().backward()) == 2 * forward, "no weight grad when frozen"


def test_bf16_trace_halves_most_activations():
    trainer = configs.trainer_class(configs.METHODS["MaskSAMTrainer"], "tiny")
    record = configs.sam_record(trainer, [8, 32, 32], 4)

    def build():
        return configs.build_sam_network(trainer, record, 1, 4)

    fp32 = memory_estimate.activation_bytes(build, 2, False, 1, record["patch_size"])
    bf16 = memory_estimate.activation_bytes(build, 2, True, 1, record["patch_size"])
    assert 0.4 * fp32["total"] < bf16["total"] < 0.9 * fp32["total"]
    assert bf16["checkpointed"] < bf16["total"] and fp32["checkpointed"] < fp32["total"]


def test_preset_rows_compare_both_attentions_through_the_trainers_builders():
    from nnunet_sam.benchmarking.configs import Preset
    from nnunet_sam.benchmarking.report import preset_row
    from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
    from nnunet_sam.trainers.pansam import PanSAMTrainer_tiny

    # SAM input 256 px: the tiny ViT's global blocks see 32x32 tokens, where stored attention matrices dominate
    # (at 8x8 tokens a 64 x 64 matrix is smaller than the widened query and key)
    big = {"sam_input_size": 256}
    preset = Preset("masksam", MaskSAMTrainer_tiny, (2, 64, 64), num_classes=4, block=big, target_gib=1)
    whole = preset_row(preset, 1, False)
    assert whole["phases"] == ["training"] and whole["patch_size"] == [2, 64, 64]
    sam, ours = whole["memory_bytes"]["sam"], whole["memory_bytes"]["sdpa"]
    assert ours["activations_fp32"] < sam["activations_fp32"], "no stored attention matrices"
    assert ours["checkpointing"] < ours["none"]
    assert whole["target"] == {"option_set": "none", "fits": True, "bytes": ours["none"]}  # fp32 only: no bf16
    # PanSAM trains in three stages (CLAHE runs as a custom operator in its forward): each stage's training forward
    # is traced through the trainer's forward_batch, and the row holds the costliest
    pansam = preset_row(Preset("pansam", PanSAMTrainer_tiny, (2, 64, 64), num_classes=2, block=big), 1, False)
    assert pansam["phases"] == ["stage 1", "stage 2", "stage 3"] and pansam["inference_scope"] == "eval forward"
    per_phase = pansam["flops"]["train_step_per_phase"]
    assert pansam["flops"]["train_step"] == max(per_phase.values()) > per_phase["stage 1"] > 0
    assert pansam["memory_bytes"]["sdpa"]["activations_fp32"] > 0
    from nnunet_sam.benchmarking.report import format_presets

    attention = [
        {
            "input_size": 512,
            "sam": {"seconds": 2.0, "peak_added_bytes": 4 * 2**30},
            "sdpa": {"seconds": 1.0, "peak_added_bytes": 2**30},
            "time_ratio": 0.5,
            "memory_ratio": 0.25,
        },
        {"input_size": 1024, "sam": {"error": ["MemoryError"]}, "sdpa": {"seconds": 3.0, "peak_added_bytes": 1}},
    ]
    text = "\n".join(format_presets([whole, pansam], attention))
    assert "masksam" in text and "pansam: training phases (train GF) stage 1" in text
    assert "time 0.50, peak memory 0.25" in text and "MemoryError" in text


@pytest.mark.parametrize(
    "trainer, planned, classes",
    [("PanSAMTrainer_tiny", (2, 64, 64), 2), ("SAM3DAdapterTrainer_prompted_tiny", (16, 64, 64), 3)],
)
def test_training_forward_trace_equals_a_real_step(trainer, planned, classes):
    """The fake-tensor trace of a trainer's own training forward (forward_batch, per stage; clicks simulated from
    the target) stores exactly the bytes a real step on real tensors stores."""
    from nnunet_sam.trainers import pansam, sam3d_adapter

    trainer = getattr(pansam, trainer, None) or getattr(sam3d_adapter, trainer)
    record = configs.sam_record(trainer, planned, classes)

    def build():
        return configs.training_network(trainer, record, 1, classes)

    for phase, forward in configs.training_forwards(trainer, classes).items():
        fake = memory_estimate.activation_bytes(build, 2, False, 1, record["patch_size"], forward)
        net = build().train()
        x = torch.randn(2, 1, *record["patch_size"])
        real = memory_estimate.SavedTensorTrace(net).run(lambda f=forward, n=net, x=x: f(n, x))
        assert fake == real, phase
        assert fake["total"] > 0, phase


def test_radsam_training_forward_trains_sam_and_traces_its_prompts():
    """RadSAM fine-tunes all of SAM: its trace is the simulated interaction of forward_batch (initial prompt and
    correction rounds), not SAM's frozen encoder. Without values the trace takes the mask-prompt path (every
    correction round's), so it holds at least what a real step with an empty reference (no mask prompt) stores."""
    from nnunet_sam.trainers.radsam import RadSAMTrainer_tiny

    record = configs.sam_record(RadSAMTrainer_tiny, (64, 64), 3)

    def build():
        return configs.training_network(RadSAMTrainer_tiny, record, 1, 3)

    net = build().train()
    assert all(p.requires_grad for p in net.parameters()), "RadSAM's configure_optimizers trains all of SAM"
    (forward,) = configs.training_forwards(RadSAMTrainer_tiny, 3).values()
    fake = memory_estimate.activation_bytes(build, 2, False, 1, record["patch_size"], forward)
    real = memory_estimate.SavedTensorTrace(net).run(lambda: forward(net, torch.randn(2, 1, *record["patch_size"])))
    assert real["total"] <= fake["total"] < 1.05 * real["total"]
    assert fake["checkpointed"] is not None, "SAM's encoder blocks store activations: they train"


def test_numpy_steps_of_the_forwards_are_operators_that_trace_without_values():
    """CLAHE (PanSAM) and the exact distance transform of slices over 256 px (RadSAM's interior clicks) run numpy as
    PyTorch custom operators: real results unchanged (equal to scipy / scikit-image), meta tensors keep the shape."""
    from scipy.ndimage import distance_transform_edt

    from nnunet_sam.network_architectures.pansam import clahe_slices
    from nnunet_sam.prompting.radsam_prompts import distance_inside

    masks = torch.zeros(2, 300, 280, dtype=torch.bool)
    masks[0, 100:200, 50:120] = True
    masks[1, 0:40, 0:280] = True
    expected = [distance_transform_edt(m)[1:-1, 1:-1] for m in torch.nn.functional.pad(masks, (1, 1, 1, 1)).numpy()]
    assert torch.equal(distance_inside(masks), torch.from_numpy(numpy.stack(expected)).float())
    assert distance_inside(masks.to("meta")).shape == masks.shape
    x = torch.rand(3, 64, 64)
    assert clahe_slices(x.to("meta")).shape == x.shape and clahe_slices(x).shape == x.shape


def test_gpu_mode_measures_presets_on_the_cpu_with_the_tiny_backbone():
    """The GPU mode's preset part (nnunet_sam.benchmarking.gpu) on the CPU: the estimate, the option set chosen
    from it and measured steps of every PanSAM stage through its trainer's forward_batch, next to the ResEnc U-Net.
    CUDA-only figures (max_memory_allocated) are None on a CPU."""
    from nnunet_sam.benchmarking import gpu
    from nnunet_sam.trainers.pansam import PanSAMTrainer_tiny

    preset = configs.Preset("tiny pansam", PanSAMTrainer_tiny, (2, 32, 32), num_classes=2)
    report = gpu.run_gpu_benchmark([preset], device="cpu", steps=1, warmup=0, short=None)
    assert report["failed"] == {} and report["skipped"] == {} and report["device"] == "cpu"
    (row,) = report["rows"]
    assert set(row["phases"]) == {"stage 1", "stage 2", "stage 3"} and row["option_set"] == "none"
    assert row["sam"]["step_s"] > 0 and row["resenc"]["step_s"] > 0 and row["sam"]["max_memory_allocated"] is None
    assert row["estimate_bytes"] > 0 and row["patch_size"] == [2, 32, 32] and row["batch_size"] == 2
    assert "tiny pansam" in gpu.format_gpu_report(report)


def test_gpu_mode_short_training_through_nnunet_commands_on_the_cpu(tmp_path, monkeypatch):
    """The GPU mode's short real training on the CPU with the tiny backbone: phantom dataset,
    nnUNetv2_plan_and_preprocess, nnUNetv2_train of the trainer copy (a few timed steps), nnU-Net's final
    checkpoint written; the report's structure."""
    from nnunet_sam.benchmarking import gpu

    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)
    short = {"iterations": 4, "phantom_shape": (16, 32, 32), "num_train": 5}
    report = gpu.run_gpu_benchmark([], device="cpu", short="MaskSAMTrainer_tiny", workdir=tmp_path, short_kwargs=short)
    assert report["failed"] == {} and report["rows"] == []
    run = report["short_training"]
    assert run["trainer"] == "MaskSAMTrainer_tiny" and run["configuration"] == "3d_fullres"
    assert run["iterations"] == 4 and run["step_s"] > 0 and run["max_memory_allocated"] is None
    assert run["batch_size"] == 2 and os.path.isfile(run["checkpoint"])
    checkpoint = torch.load(run["checkpoint"], map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 1 and checkpoint["init_args"]["configuration"] == "3d_fullres"
    assert "short training (nnUNetv2_train MaskSAMTrainer_tiny" in gpu.format_gpu_report(report)


def test_gpu_mode_stops_at_its_time_budget():
    from nnunet_sam.benchmarking import gpu
    from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny

    preset = configs.Preset("tiny", MaskSAMTrainer_tiny, (2, 32, 32), num_classes=3)
    report = gpu.run_gpu_benchmark([preset], device="cpu", short=None, budget_s={"presets": -1})
    assert report["rows"] == [] and "time budget" in report["skipped"]["tiny b2"]


def test_gpu_mode_without_a_gpu_exits_2_before_any_work(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.run(["--device", "cuda"])
    assert exit_info.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err


def test_trainer_memory_controls_estimate_the_training_forward(tmp_path, monkeypatch):
    """On CUDA (here faked: 2 GiB, bf16) a trainer's memory controls trace its own training forward with its
    trainable parameters: RadSAM's simulated interaction through all of SAM, not the frozen encoder path."""
    from types import SimpleNamespace

    from sam_testing import dataset_json, minimal_plans

    from nnunet_sam.trainers.base import AUTOCAST_ENV, CHECKPOINTING_ENV
    from nnunet_sam.trainers.radsam import RadSAMTrainer_tiny

    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    for var in ("nnUNet_SAM_checkpoints", CHECKPOINTING_ENV, AUTOCAST_ENV):
        monkeypatch.delenv(var, raising=False)
    plans = minimal_plans([64, 64], "2d")
    plans["configurations"]["2d"]["normalization_schemes"] = ["ZScoreNormalization"]
    data = tmp_path / "nnUNet_preprocessed" / plans["dataset_name"] / plans["configurations"]["2d"]["data_identifier"]
    data.mkdir(parents=True)
    (data / "case.b2nd").touch()  # initialize() reads only the file ending of the preprocessed data
    trainer = RadSAMTrainer_tiny(plans, "2d", 0, dataset_json(2), torch.device("cpu"))
    trainer.initialize()
    logged = []
    monkeypatch.setattr(trainer, "print_to_log_file", lambda *args, **kwargs: logged.append(" ".join(map(str, args))))
    gpu = SimpleNamespace(total_memory=2 * memory_estimate.GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    trainer.device = torch.device("cuda")
    trainer.memory_controls()
    (line,) = [text for text in logged if text.startswith("Memory controls")]
    assert "(GiB, training forward, largest of training)" in line, line
    assert trainer._autocast_dtype == torch.bfloat16 and not trainer._checkpointing
    record = trainer.sam_record
    (forward,) = configs.training_forwards(RadSAMTrainer_tiny, 3).values()
    net = trainer._plain_network()
    activations = memory_estimate.activation_bytes(
        lambda: configs.training_network(RadSAMTrainer_tiny, record, 1, 3), trainer.batch_size, True, 1,
        record["patch_size"], forward,
    )["total"]  # fmt: skip
    params = sum(p.numel() for p in net.parameters())
    expected = memory_estimate.memory_estimate({"total": params, "trainable": params}, 1, activations)
    assert f"estimated peak {expected / memory_estimate.GIB:.1f} GiB" in line


@pytest.mark.parametrize("option", ["--backbones", "--cpu-backbones"])
def test_an_unknown_backbone_is_refused_not_skipped(option, capsys):
    with pytest.raises(SystemExit) as stopped:
        benchmark.parse_args([option, "tiny", "vit_zz"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "invalid choice: 'vit_zz'" in error and "lite_medsam" in error
