"""Multi-GPU training (nnU-Net's ``-num_gpus``, DistributedDataParallel) of the SAM trainers, on CPU with gloo.

Two processes each build the network with the trainer's own code (network, frozen/trainable split, loss,
optimiser), wrap it with ``wrap_ddp`` as ``SAMTrainer.initialize`` does (here after a stock wrapper, same network)
and train a few steps on their half of a global batch. The parent repeats every step in one process on the whole
batch from the same weights: gradients must be identical across ranks and equal the one-process ones.
All cases run in one spawn (starting two interpreters is most of the time).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sam_testing import dataset_json, minimal_plans, write_tiny_checkpoint
from torch.nn.parallel import DistributedDataParallel

from nnunet_sam.losses.set_criterion import MaskSetCriterion
from nnunet_sam.trainers.base import wrap_ddp
from nnunet_sam.trainers.masksam import MaskSAMTrainer_tiny
from nnunet_sam.trainers.self_prompt_sam import SelfPromptSAMTrainer_tiny

WORLD_SIZE = 2
PER_RANK_BATCH = 2
PATCH = [2, 32, 32]  # the tiny patch rule keeps it: 2 slices, one 32 px window
NUM_CLASSES = 3
# case -> (trainer, SAM checkpoint present (SAM frozen) or not (SAM trains too), stage of every step)
CASES = {
    "masksam": (MaskSAMTrainer_tiny, True, [0, 0]),
    "masksam_sam_trains": (MaskSAMTrainer_tiny, False, [0, 0]),
    "self_prompt": (SelfPromptSAMTrainer_tiny, True, [1, 1, 2, 2]),
    "self_prompt_sam_trains": (SelfPromptSAMTrainer_tiny, False, [1, 2]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(case: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 1, D, P, P) and labels with 0-2 random boxes per class and slice: classes vary between samples."""
    g = torch.Generator().manual_seed(1000 * list(CASES).index(case) + step)
    b = WORLD_SIZE * PER_RANK_BATCH
    target = torch.zeros(b, 1, *PATCH)
    for i in range(b):
        for z in range(PATCH[0]):
            for c in range(1, NUM_CLASSES):
                if torch.rand(1, generator=g) < 0.7:
                    y, x = torch.randint(0, 24, (2,), generator=g).tolist()
                    h, w = torch.randint(4, 9, (2,), generator=g).tolist()
                    target[i, 0, z, y : y + h, x : x + w] = c
    image = target + 0.5 * torch.randn(target.shape, generator=g)
    return image, target


def _trainer(case: str, checkpoints: Path):
    trainer_class, with_checkpoint, _ = CASES[case]
    if with_checkpoint:
        os.environ["nnUNet_SAM_checkpoints"] = str(checkpoints)
    else:
        os.environ.pop("nnUNet_SAM_checkpoints", None)
    trainer = trainer_class(minimal_plans(PATCH), "3d_fullres", 0, dataset_json(NUM_CLASSES - 1), torch.device("cpu"))
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, 1, NUM_CLASSES
    )
    trainer.optimizer, _ = trainer.configure_optimizers()  # applies the frozen/trainable rule
    trainer.loss = trainer._build_loss()
    if isinstance(trainer.loss, MaskSetCriterion):  # random loss points differ between processes: every pixel, so
        trainer.loss.point_sampling, trainer.loss.num_points = "pixels", PATCH[-1] * PATCH[-2]  # both compute one loss
    return trainer


def _train(case: str, trainer, model: torch.nn.Module, batch: slice) -> tuple[list[dict], list[dict]]:
    """nnU-Net's train_step core for every step of the case, with the trainer's optimiser.

    Returns the gradients of every step by parameter name and the weights before every step.
    """
    net = model.module if isinstance(model, DistributedDataParallel) else model
    grads, states = [], []
    for step, stage in enumerate(CASES[case][2]):
        mode = {"run_decoder": stage == 2} if stage else {}  # what SelfPromptSAMTrainer.forward_batch passes
        states.append({k: v.clone() for k, v in net.state_dict().items()})
        image, target = _global_batch(case, step)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss(model(image[batch], **mode), target[batch]).backward()
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()})
        trainer.optimizer.step()
    return grads, states


def _one_process_gradients(case: str, trainer, states: list[dict]) -> list[dict]:
    """Each step's gradients in one process on the whole global batch, from the DDP run's weights of that step."""
    net = trainer.network
    grads = []
    for step, stage in enumerate(CASES[case][2]):
        mode = {"run_decoder": stage == 2} if stage else {}
        net.load_state_dict(states[step])
        image, target = _global_batch(case, step)
        net.zero_grad(set_to_none=True)
        trainer.loss(net(image, **mode), target).backward()
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()})
    return grads


def _worker(rank: int, port: int, out: Path, checkpoints: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        for case in CASES:
            trainer = _trainer(case, checkpoints)
            assert trainer.is_ddp
            # SAMTrainer.initialize builds wrap_ddp's wrapper in place of nnU-Net's; re-wrapping is the same network
            stock = DistributedDataParallel(trainer.network)
            trainer.network = wrap_ddp(stock.module, torch.device("cpu"))
            del stock
            part = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
            grads, states = _train(case, trainer, trainer.network, part)
            params = list(trainer.network.module.parameters())
            result = {
                "states": states,
                "grads": grads,
                "ddp": trainer.network._get_ddp_logging_data(),
                "trainable": [p for p in params if p.requires_grad],
                "num_parameters": len(params),
            }
            torch.save(result, out / f"{case}_{rank}.pt")

        # nnU-Net's own wrapper in Self-Prompt-SAM's stage 1: the step after the first one must fail.
        trainer = _trainer("self_prompt", checkpoints)
        stock = DistributedDataParallel(trainer.network)
        error = ""
        try:
            _train("self_prompt", trainer, stock, slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH))
        except RuntimeError as e:
            error = str(e)
        torch.save(error, out / f"stock_{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    write_tiny_checkpoint(checkpoints)
    with pytest.MonkeyPatch.context() as mp_env:
        for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
            mp_env.setenv(var, str(root / var))
        mp_env.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(_free_port(), root, checkpoints), nprocs=WORLD_SIZE, join=True)
        results = {
            f.stem: torch.load(f, weights_only=False)  # our own test output
            for f in root.glob("*.pt")
        }
        references = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the workers: other thread counts change float summation orders
        try:
            for case in CASES:
                trainer = _trainer(case, checkpoints)
                assert not trainer.is_ddp
                references[case] = _one_process_gradients(case, trainer, results[f"{case}_0"]["states"])
        finally:
            torch.set_num_threads(threads)
    return results, references


def test_nnunet_ddp_wrapper_stops_in_self_prompt_stage_one(ddp_results):
    """Why wrap_ddp exists: stage 1 leaves the decoder side without gradients."""
    results, _ = ddp_results
    for rank in range(WORLD_SIZE):
        assert "Expected to have finished reduction in the prior iteration" in results[f"stock_{rank}"]


@pytest.mark.parametrize("case", list(CASES))
def test_only_trainable_parameters_are_synchronised(ddp_results, case):
    result = ddp_results[0][f"{case}_0"]
    trainable = result["trainable"]
    assert int(result["ddp"]["num_parameter_tensors"]) == len(trainable)
    assert int(result["ddp"]["total_parameter_size_bytes"]) == sum(4 * p.numel() for p in trainable)
    sam_frozen = CASES[case][1]
    assert (len(trainable) < result["num_parameters"]) == sam_frozen


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_across_ranks_and_one_process(ddp_results, case):
    results, references = ddp_results
    rank0, rank1 = results[f"{case}_0"]["grads"], results[f"{case}_1"]["grads"]
    for step, (g0, g1, ref) in enumerate(zip(rank0, rank1, references[case], strict=True)):
        for name, reference in ref.items():
            assert (g0[name] is None) == (g1[name] is None) == (reference is None), f"step {step} {name}"
            if reference is None:
                continue
            assert torch.equal(g0[name], g1[name]), f"step {step}: ranks disagree on {name}"
            where = f"step {step} {name}"
            # float32 sums over a batch of 4 vs 2 + 2 differ in order; gradients such as the stem's are sums of
            # cancelling terms, so the tolerance scales with the tensor's magnitude (a wrong DDP average would be
            # off by its whole magnitude)
            atol = max(1e-6, 1e-4 * float(reference.abs().max()))
            torch.testing.assert_close(g0[name], reference, rtol=1e-4, atol=atol, msg=lambda m, w=where: f"{w}: {m}")
        assert any(g is not None for g in g0.values()), f"step {step}: nothing was trained"
    for state0, state1 in zip(results[f"{case}_0"]["states"], results[f"{case}_1"]["states"], strict=True):
        assert all(torch.equal(state0[k], state1[k]) for k in state0), "the ranks' weights drifted apart"
