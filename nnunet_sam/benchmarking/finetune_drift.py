"""Does fine-tuning keep what pretraining knew? RadSAM's optimiser chosen from evidence.

``python -m nnunet_sam.benchmarking.finetune_drift [--steps 20] [--reference-files DIR]``: RadSAM with LiteMedSAM's
weights and its input contract is fine-tuned for ``--steps`` CPU steps (batch 2 slices, simulated prompts with two
correction rounds, RadSAM's loss, all of SAM trainable, gradient norm clipped at 12 as nnU-Net does) on the liver,
spleen and kidneys of the real CT of :mod:`nnunet_sam.benchmarking.real_images`, once with nnU-Net's SGD (LR 1e-2,
momentum 0.99, Nesterov, weight decay 3e-5) and once with AdamW (LR 1e-5, weight decay 3e-5). Then the zero-shot box
Dice (slice level, tight boxes) of structures it never trained on (stomach, aorta, IVC) is compared with the
pretrained model's. Seeded; about half an hour of one CPU core.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from nnunet_sam.backbones.checkpoints import find_checkpoint, load_checkpoint, resize_to_input
from nnunet_sam.backbones.contract import SOFT_TISSUE_WINDOW_HU
from nnunet_sam.backbones.sam_vit import get_backbone
from nnunet_sam.benchmarking.real_images import fetch_reference_files, tight_box
from nnunet_sam.evaluation.metrics import dice
from nnunet_sam.inference.radsam import SliceModel
from nnunet_sam.losses.segmentation import RadSAMLoss
from nnunet_sam.network_architectures.radsam import RadSAMNetwork, RadSAMOptions, intensity_windows
from nnunet_sam.prompting.radsam_prompts import SimulatedInteraction, pick_structures

TRAINED = {1: 1, 2: 2, 3: 3, 5: 4}  # TotalSegmentator spleen, kidneys, liver -> classes 1-4
HELD_OUT = {"stomach": 6, "aorta": 52, "inferior_vena_cava": 63}
PATCH = 128


def network(state: dict) -> RadSAMNetwork:
    net = RadSAMNetwork("lite_medsam", 1, [PATCH, PATCH], 256, RadSAMOptions(ct_window_hu=SOFT_TISSUE_WINDOW_HU))
    net.sam.load_state_dict(state)
    net.set_intensity_windows(intensity_windows(["NoNormalization"], {}, SOFT_TISSUE_WINDOW_HU))
    return net


def held_out_dice(net: RadSAMNetwork, ct: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Slice-level zero-shot Dice of the structures never trained on (tight box on every slice)."""
    net.eval()
    slices = SliceModel(net, ct[None])
    out = {}
    for name, label in HELD_OUT.items():
        truth = labels == label
        pred = np.zeros_like(truth)
        for z in np.flatnonzero(truth.reshape(len(truth), -1).any(1)):
            pred[z] = slices.predict(int(z), box=tight_box(truth[z]))
        out[name] = round(dice(pred, truth), 3)
    return out


def fine_tune(state: dict, ct: np.ndarray, labels: np.ndarray, optimiser: str, steps: int) -> RadSAMNetwork:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    pad = ((0, 0), (0, PATCH - ct.shape[1]), (0, PATCH - ct.shape[2]))
    image = np.pad(ct, pad, constant_values=-1024.0)
    target = np.zeros_like(labels)
    for source, cls in TRAINED.items():
        target[labels == source] = cls
    target = np.pad(target, pad)
    usable = [z for z in range(len(target)) if (target[z] > 0).sum() > 50]
    net = network(state)
    net.sam.requires_grad_(True)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    if optimiser == "sgd":
        opt = torch.optim.SGD(params, 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        opt = torch.optim.AdamW(params, 1e-5, weight_decay=3e-5)
    loss_fn = RadSAMLoss()
    for _ in range(steps):
        zs = rng.choice(usable, 2, replace=False)
        data = torch.from_numpy(image[zs])[:, None]
        structures = pick_structures(torch.from_numpy(target[zs].astype(np.int64))[:, None], len(TRAINED) + 1)
        loss = loss_fn(net(data, interaction=SimulatedInteraction(structures[:, 0].bool(), 2)), structures)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 12)
        opt.step()
    return net


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--reference-files", help="the totalsegmentator sdist's tests/reference_files (default: download)")
    args = p.parse_args(argv)
    cache = os.environ.get("NNUNET_SAM_TEST_DATA") or Path.home() / ".cache" / "nnunet_sam" / "test_data"
    files = Path(args.reference_files) if args.reference_files else fetch_reference_files(cache)
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(files / "example_ct_sm.nii.gz"))).astype(np.float32)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(files / "example_seg.nii.gz")))
    spec = get_backbone("lite_medsam")
    state = resize_to_input(load_checkpoint(find_checkpoint(spec), spec), spec, 256)
    torch.set_num_threads(1)
    print("pretrained", held_out_dice(network(state), ct, labels), flush=True)
    for optimiser in ("adamw", "sgd"):
        tuned = fine_tune(state, ct, labels, optimiser, args.steps)
        print(f"{optimiser} after {args.steps} steps", held_out_dice(tuned, ct, labels), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def decoder_trained_radsam(zero_shot: SliceModel, labels: np.ndarray, steps: int = 60) -> SliceModel:
    """A trained RadSAM on one volume without re-encoding it: LiteMedSAM's encoder frozen (its embeddings taken from
    ``zero_shot``, a zero-shot :class:`SliceModel` of the same preprocessed volume), SAM's prompt encoder and mask
    decoder trained ``steps`` AdamW steps (LR 1e-4, batch 2 slices) with RadSAM's simulated interaction (box, point or
    mask prompt, then two correction rounds with clicks and the previous mask) and RadSAM's loss on the liver, spleen
    and kidneys of ``labels`` (Z, Y, X) (TotalSegmentator's ids). Returns the trained model on the volume's slices,
    propagating with mask prompts as every trained RadSAM does. Seeded."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    depth, h, w = zero_shot.shape
    size = max(h, w)  # the whole slice as one square patch, the slice at its top left as in the embedding's frame
    target = np.zeros((depth, size, size), dtype=np.int64)
    for source, cls in TRAINED.items():
        target[:, :h, :w][labels == source] = cls
    embeddings = torch.cat([zero_shot.embedding(z) for z in range(depth)])
    net = RadSAMNetwork("lite_medsam", 1, [size, size], 256, RadSAMOptions(ct_window_hu=SOFT_TISSUE_WINDOW_HU))
    net.load_state_dict(zero_shot.network.state_dict(), strict=False)
    net.requires_grad_(False)
    trained = [net.sam.prompt_encoder, net.sam.mask_decoder]
    for module in trained:
        module.requires_grad_(True)
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, 1e-4, weight_decay=3e-5)
    loss_fn = RadSAMLoss()
    usable = [z for z in range(depth) if (target[z] > 0).sum() > 50]
    net.train()
    for _ in range(steps):
        zs = rng.choice(usable, 2, replace=False)
        net.embed = lambda x, zs=zs: embeddings[zs]  # noqa: B023 (the frozen encoder's embeddings of these slices)
        structures = pick_structures(torch.from_numpy(target[zs])[:, None], len(TRAINED) + 1)
        loss = loss_fn(net(torch.zeros(2, 1, size, size), interaction=SimulatedInteraction(structures[:, 0].bool(), 2)),
                       structures)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 12)
        opt.step()
    del net.embed
    net.eval()
    model = SliceModel(net, zero_shot.volume)
    model._embeddings = dict(zero_shot._embeddings)
    return model
