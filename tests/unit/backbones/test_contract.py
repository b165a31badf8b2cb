"""Each backbone's input contract (nnunet_sam.backbones.contract) against the backbone package's own code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from nnunet_sam.backbones.contract import CONTRACTS, LITE_MEDSAM_CONTRACT, SAM_CONTRACT, input_contract
from nnunet_sam.backbones.sam_vit import BACKBONES, build_sam
from nnunet_sam.model_record import ModelRecord
from nnunet_sam.network_architectures.radsam import RadSAMNetwork, RadSAMOptions, intensity_windows
from nnunet_sam.prompting.radsam_prompts import Prompts


def test_every_backbone_has_a_contract_with_its_source():
    assert set(CONTRACTS) == set(BACKBONES)
    for name, contract in CONTRACTS.items():
        assert contract.source, name
    assert input_contract("lite_medsam").input_size == 256 and input_contract("vit_h").input_size == 1024
    assert LITE_MEDSAM_CONTRACT.pixel_mean is None and LITE_MEDSAM_CONTRACT.min_max  # no ImageNet statistics
    assert input_contract("medsam").resize == "stretch"
    with pytest.raises(ValueError, match="Known"):
        input_contract("vit_zz")


@pytest.mark.parametrize("shape", [(100, 150), (150, 100), (64, 64)])
def test_sam_contract_is_segment_anythings_preprocessing(shape):
    """ResizeLongestSide + Sam.preprocess (normalise, then pad with 0) on an RGB image; PIL rounds the resized image
    to uint8, so values agree to 1/255 of SAM's [0, 255] range after its normalisation."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    transform = ResizeLongestSide(1024)
    resized = torch.as_tensor(transform.apply_image(image)).permute(2, 0, 1)[None].float()
    sam = Sam(None, None, None)  # preprocess needs only the pixel statistics and the encoder's size
    sam.image_encoder = type("E", (), {"img_size": 1024})()
    expected = sam.preprocess(resized)
    ours = SAM_CONTRACT.to_input(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
    nh, nw = transform.get_preprocess_shape(*shape, 1024)
    assert SAM_CONTRACT.resized_shape(*shape) == (nh, nw)
    assert ours.shape == expected.shape == (1, 3, 1024, 1024)
    assert torch.equal(ours[..., nh:, :], torch.zeros_like(ours[..., nh:, :]))  # padding after normalisation
    assert torch.equal(ours[..., nw:], torch.zeros_like(ours[..., nw:]))
    inside = (ours - expected)[..., :nh, :nw].abs()
    assert inside.mean() < 0.02 and inside.max() < 0.6  # PIL vs torch bilinear near edges, uint8 rounding


def test_sam_contract_scales_coordinates_and_masks_as_segment_anything():
    transform = ResizeLongestSide(1024)
    sy, sx = SAM_CONTRACT.coordinate_scale(100, 150)
    coords = np.array([[10.0, 20.0], [149.0, 99.0]])  # (x, y)
    np.testing.assert_allclose(coords * [sx, sy], transform.apply_coords(coords, (100, 150)), rtol=1e-6)
    logits = torch.randn(1, 1, 1024, 1024)
    sam = Sam(None, None, None)
    sam.image_encoder = type("E", (), {"img_size": 1024})()
    expected = sam.postprocess_masks(torch.nn.functional.interpolate(logits, 256), (683, 1024), (100, 150))
    ours = SAM_CONTRACT.to_slice(torch.nn.functional.interpolate(logits, 256), 100, 150)
    assert ours.shape == (1, 1, 100, 150)
    # postprocess_masks upsamples the 256-px low-res masks to 1024 first; to_slice takes input-size logits
    upsampled = torch.nn.functional.interpolate(torch.nn.functional.interpolate(logits, 256), 1024, mode="bilinear")
    torch.testing.assert_close(SAM_CONTRACT.to_slice(upsampled, 100, 150), expected)


def test_lite_medsam_stem_is_the_recipes_input():
    """A CT slice in HU through RadSAM's input-contract stem (LiteMedSAM, HU plans) equals the tensor LiteMedSAM's
    recipe feeds its encoder (soft-tissue window, longest side to 256, min-max, black padding)."""
    from nnunet_sam.benchmarking.real_images import recipe_input, render_slice

    rng = np.random.default_rng(1)
    hu = rng.uniform(-1100, 1200, (101, 122)).astype(np.float32)
    options = RadSAMOptions(ct_window_hu=(-160.0, 240.0), prompt_tokens="sam")
    net = RadSAMNetwork("tiny", 1, [64, 64], 256, options)  # the stem does not depend on the encoder's weights
    net.contract = LITE_MEDSAM_CONTRACT
    net.stem.contract = LITE_MEDSAM_CONTRACT
    net.set_intensity_windows(intensity_windows(["NoNormalization"], {}, (-160.0, 240.0)))
    ours = net.stem(torch.from_numpy(hu)[None, None])
    expected, (nh, nw) = recipe_input(render_slice(hu, "CT"))
    assert (nh, nw) == (212, 256)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_sam_tokens_of_a_box_alone_carry_no_padding_point():
    sam = build_sam(BACKBONES["tiny"], 128)
    net = RadSAMNetwork("tiny", 1, [64, 64], 128, RadSAMOptions(prompt_tokens="sam"))
    net.sam.load_state_dict(sam.state_dict())
    prompts = Prompts.empty(1, 128, 128)
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0]])
    prompts = Prompts(prompts.points, prompts.labels, boxes, torch.ones(1, dtype=torch.bool), prompts.masks,
                      prompts.has_mask)  # fmt: skip
    sparse, dense = net.embed_prompts(prompts)
    expected_sparse, expected_dense = sam.prompt_encoder(points=None, boxes=boxes, masks=None)
    torch.testing.assert_close(sparse, expected_sparse)
    torch.testing.assert_close(dense, expected_dense)
    padded = RadSAMNetwork("tiny", 1, [64, 64], 128, RadSAMOptions(prompt_tokens="padded"))
    padded.sam.load_state_dict(sam.state_dict())
    assert padded.embed_prompts(prompts)[0].shape[1] == 4  # two padding points in front of the box


def test_new_radsam_records_follow_the_contract_and_old_records_keep_the_legacy_stem():
    from nnunet_sam.trainers.radsam import RadSAMTrainer_LiteMedSAM, RadSAMTrainer_tiny

    assert RadSAMTrainer_tiny.default_sam_input_size() is None  # the patch size (a cost choice, see the docstring)
    assert RadSAMTrainer_LiteMedSAM.default_sam_input_size() == 256
    assert RadSAMTrainer_LiteMedSAM.options.ct_window_hu == (-160.0, 240.0)
    old = ModelRecord.from_block(
        {"backbone": "tiny", "patch_size": [64, 64], "sam_input_size": 64, "num_queries": 8},
        RadSAMTrainer_tiny.record_options(),
    )
    assert old.options.input_contract is False and old.options.propagation == "mask"
    network = RadSAMTrainer_tiny.build_network(old, 1, 4)
    assert network.contract is None  # the stem it was trained with
