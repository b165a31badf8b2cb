"""Self-Prompt-SAM network and trainer: equality with SAM at init, stages, ablation variants."""

from __future__ import annotations

import pytest
import torch
from sam_testing import dataset_json, minimal_plans

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.losses.segmentation import DeepSupervisedSegLoss
from nnunet_sam.network_architectures.self_prompt_sam import (
    ABLATION_ROWS,
    SelfPromptSAMNetwork,
    SelfPromptSAMOptions,
)
from nnunet_sam.trainers import self_prompt_sam as trainers

PATCH = (2, 32, 32)


@pytest.fixture(autouse=True)
def _single_thread():
    """Small tensors: intra-op threads only add contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(options: SelfPromptSAMOptions | None = None, patch=PATCH, classes=3) -> SelfPromptSAMNetwork:
    torch.manual_seed(0)
    return SelfPromptSAMNetwork("tiny", 2, classes, patch, patch[-1], options)


def _target(patch=PATCH) -> torch.Tensor:
    target = torch.zeros(2, 1, *patch)
    target[..., 4:14, 6:20] = 1
    target[..., 18:28, 10:30] = 2
    target[0, :, 0, 18:28, 10:30] = 0  # class 2 absent from one slice: its prompts come from an empty mask
    return target


def test_encoder_equals_stock_sam_at_init():
    net = _net()
    stock = build_sam(get_backbone("tiny"), 32).image_encoder
    stock.load_state_dict(net.sam.image_encoder.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.encoder_additions(net.sam.image_encoder, x)[0], stock(x))


def test_outputs_and_2d():
    net = _net()
    out = net(torch.randn(2, 2, *PATCH), return_all=True)
    assert [tuple(a.shape) for a in out["aux"]] == [
        (2, 3, 2, 4, 4),
        (2, 3, 2, 8, 8),
        (2, 3, 2, 16, 16),
        (2, 3, 2, 32, 32),
    ]
    assert out["binary"].shape == (2, 2, 3, 32, 32)  # background is prompted too
    assert out["logits"].shape == out["semantic"].shape == (2, 3, 2, 32, 32)
    net2d = _net(patch=(32, 32)).eval()
    with torch.no_grad():
        assert net2d(torch.randn(3, 2, 32, 32)).shape == (3, 3, 32, 32)


def _grads(net: SelfPromptSAMNetwork) -> dict[str, bool]:
    return {
        n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in net.named_parameters() if p.requires_grad
    }


def test_stage_one_trains_only_the_prompt_generation_path():
    net = _net()
    DeepSupervisedSegLoss()(net(torch.randn(2, 2, *PATCH), run_decoder=False), _target()).backward()
    stage1 = {id(p) for m in net.prompt_generation_modules() for p in m.parameters() if p.requires_grad}
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert (p.grad is not None) == (id(p) in stage1), f"{name}: gradient in stage 1 is wrong"
    assert not any(p.grad is not None for p in net.sam.parameters())


def test_stage_two_reaches_every_trainable_parameter():
    net = _net()
    net.sam.requires_grad_(True)
    with torch.no_grad():  # adapters and the MC-Adapter start at zero; open them so every weight gets a gradient
        for p in net.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    DeepSupervisedSegLoss()(net(torch.randn(2, 2, *PATCH)), _target()).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None and not n.startswith("sam.")]
    assert not missing, f"no gradient for {missing}"


def test_stage_follows_the_epoch_so_resuming_picks_the_right_one(tmp_path, monkeypatch):
    for var in ("nnUNet_results", "nnUNet_preprocessed", "nnUNet_raw"):
        monkeypatch.setenv(var, str(tmp_path / var))
    monkeypatch.delenv("nnUNet_SAM_checkpoints", raising=False)

    class Short(trainers.SelfPromptSAMTrainer_tiny):
        epochs = 10

    trainer = Short(minimal_plans([24, 96, 96]), "3d_fullres", 0, dataset_json(2), torch.device("cpu"))
    assert [trainer.stage(e) for e in range(10)] == [1, 1] + [2] * 8
    trainer.network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    network, calls = trainer.network, []

    def spy(x, **arguments):  # the real network, recording the mode arguments the trainer passes
        calls.append(arguments)
        return network(x, **arguments)

    x = torch.randn(2, 1, *trainer.sam_record["patch_size"])
    for epoch, decode in ((5, True), (1, False), (2, True)):  # e.g. --c from a checkpoint of that epoch
        trainer.current_epoch = epoch
        trainer.network = network
        trainer.on_train_epoch_start()
        trainer.network = spy
        output = trainer.forward_batch(x, None)
        assert calls[-1]["run_decoder"] is decode
        assert ("logits" in output) is decode, "stage 1 must skip SAM's decoder, stage 2 run it"


@pytest.mark.parametrize("row", [f"S{i}" for i in range(1, 10)])
def test_ablation_rows_build_their_modules_and_train_one_step(row):
    """Every row of the paper's Table 3 is a trainer whose network has that row's modules and trains."""
    options = getattr(trainers, f"SelfPromptSAMTrainer_{row}").options
    assert options == ABLATION_ROWS[row]
    expected_adapter = {"S1": None, "S2": None, "S3": "vanilla", "S4": "dmlp_before", "S5": "dmlp_after"}.get(
        row, "dmlp"
    )
    net = _net(options)
    enc, dec = net.encoder_additions, net.decoder_additions
    adapters = [*enc.attn_adapters, *enc.mlp_adapters, *dec.self_attn, *dec.token_to_image, *dec.mlp]
    adapters += list(dec.image_to_token)
    if expected_adapter is None:
        assert all(type(a).__name__ == "_NoAdapter" for a in adapters)
    else:
        assert all(getattr(a, "kind", None) == expected_adapter for a in adapters)
    depth_mlp = {"S4": "mixer_before", "S5": "mixer_after"}.get(row)
    if depth_mlp is not None:
        assert all(getattr(a, depth_mlp) is not None and a.mixer is None for a in adapters)
    depth_embedding = row in ("S7", "S8", "S9")
    assert (enc.depth_embedding is not None) == (dec.depth_embedding is not None) == depth_embedding
    assert type(net.stem).__name__ == ("ModalityStem" if row in ("S8", "S9") else "PlainStem")
    assert (net.mc_adapter is not None) == (row == "S9")
    assert net.generator.pyramid.num_skips == (0 if row == "S1" else 3)
    params = [p for p in net.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = DeepSupervisedSegLoss()(net(torch.randn(2, 2, *PATCH)), _target())
    loss.backward()
    torch.optim.SGD(params, lr=0.01, momentum=0.9).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
