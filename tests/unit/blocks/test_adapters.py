"""Depth-aware adapters mix neighbouring slices of one volume only, on the unpartitioned token grid."""

from __future__ import annotations

import pytest
import torch

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.blocks.adapters import ADAPTER_KINDS, Adapter, AdapterKindSpec, register_adapter_kind, unfold_depth
from nnunet_sam.blocks.injection import EncoderAdditions
from nnunet_sam.blocks.volumetric_encoder import VolumetricEncoder
from nnunet_sam.network_architectures.sam3d_adapter import SAM3DAdapterNetwork, SAM3DAdapterOptions


def _randomise(module: torch.nn.Module) -> None:
    torch.manual_seed(1)
    for p in module.parameters():
        p.data.normal_(0, 0.5)


def test_adapters_start_as_identity():
    x = torch.randn(6, 4, 4, 16)
    for kind in ("vanilla", "dmlp", "dconv", "dmlp_before", "dmlp_after"):
        torch.testing.assert_close(Adapter(16, kind, depth=3)(x, 3), x)
        assert torch.count_nonzero(Adapter(16, kind, depth=3, skip=False)(x, 3)) == 0


def test_dconv_adapter_mixes_only_neighbouring_slices_of_one_volume():
    volumes, depth = 2, 5
    adapter = Adapter(8, "dconv", depth)
    _randomise(adapter)
    x = torch.randn(volumes * depth, 6, 6, 8)
    y = x.clone()
    y[2, 3, 3] += 1.0  # volume 0, slice 2, token (3, 3)
    diff = (adapter(y, depth) - adapter(x, depth)).abs().sum(-1).view(volumes, depth, 6, 6) > 0
    assert diff[0, 1:4, 2:5, 2:5].all(), "the 3x3x3 neighbourhood must change"
    assert not diff[1].any(), "another volume of the batch changed"
    assert not diff[0, [0, 4]].any(), "slices two away changed"
    assert not diff[0, :, [0, 1, 5]].any() and not diff[0, :, :, [0, 1, 5]].any(), "far tokens changed"


def test_dmlp_adapter_mixes_slices_of_one_volume_at_the_same_position():
    volumes, depth = 3, 4
    adapter = Adapter(8, "dmlp", depth)
    _randomise(adapter)
    x = torch.randn(volumes * depth, 7, 8)  # decoder tokens: (rows, tokens, C)
    y = x.clone()
    y[depth + 1, 2] += 1.0  # volume 1, slice 1, token 2
    diff = (adapter(y, depth) - adapter(x, depth)).abs().sum(-1).view(volumes, depth, 7) > 0
    assert diff[1, :, 2].all(), "every slice of the volume must see the change"
    assert not diff[[0, 2]].any(), "other volumes changed"
    assert not diff[1, :, [0, 1, 3, 4, 5, 6]].any(), "other token positions changed"


@pytest.mark.parametrize("kind", ["dmlp_before", "dmlp_after"])
def test_depth_mlp_before_or_after_the_bottleneck_is_placed_where_named(kind):
    """MaskSAM B6/B7, Self-Prompt-SAM S4/S5: a depth MLP (with skip) on the adapter's input or on its output."""
    volumes, depth, dim = 2, 4, 8
    adapter = Adapter(dim, kind, depth, skip=False)
    _randomise(adapter)
    mixer = adapter.mixer_before if kind == "dmlp_before" else adapter.mixer_after
    assert adapter.mixer is None and mixer is not None and mixer.fc1.in_features == depth
    x = torch.randn(volumes * depth, 5, dim)
    with torch.no_grad():
        if kind == "dmlp_before":
            expected = adapter.up(adapter.act(adapter.down(mixer(x, depth))))
        else:
            expected = mixer(adapter.up(adapter.act(adapter.down(x))), depth)
        torch.testing.assert_close(adapter(x, depth), expected)
        # it mixes the slices of one volume at one token position, like the DMLPAdapter
        y = x.clone()
        y[depth + 1, 2] += 1.0
        diff = (adapter(y, depth) - adapter(x, depth)).abs().sum(-1).view(volumes, depth, 5) > 0
    assert diff[1, :, 2].all() and not diff[0].any() and not diff[1, :, [0, 1, 3, 4]].any()


@pytest.mark.parametrize("kind", ["dconv", "dmlp", "dmlp_before", "dmlp_after"])
def test_encoder_block_depth_mixing_uses_unpartitioned_grid(kind):
    """In a windowed block a change in one window of slice d reaches slice d+1 near that window only.

    A depth adapter applied to window-partitioned tokens (the public MaskSAM code) mixes windows of one
    slice or slices of other volumes instead; both show up here.
    """
    spec = get_backbone("tiny")
    encoder = build_sam(spec, 64).image_encoder  # 8x8 tokens, 4x4 windows -> 4 windows per slice
    block = encoder.blocks[0]
    assert block.window_size == 4
    volumes, depth = 2, 4
    additions = EncoderAdditions(spec.embed_dim, spec.depth, depth, kind=kind)
    _randomise(additions)
    x = torch.randn(volumes * depth, 8, 8, spec.embed_dim)
    y = x.clone()
    y[1, 0, 0] += 1.0  # volume 0, slice 1, token (0, 0) in the top-left window
    with torch.no_grad():
        diff = (additions._block(0, block, y) - additions._block(0, block, x)).abs().sum(-1) > 1e-6
    diff = diff.view(volumes, depth, 8, 8)
    assert diff[0, 1, :4, :4].all(), "the attention window of the changed token"
    assert diff[0, 0].any() and diff[0, 2].any(), "neighbouring slices must be mixed"
    assert not diff[1].any(), "another volume of the batch changed"
    assert not diff[0, 1, 6:, 6:].any(), "a far window of the same slice changed"
    assert not diff[0, 0, 6:, 6:].any() and not diff[0, 2, 6:, 6:].any(), "far windows of neighbouring slices"


class _DepthMean(torch.nn.Module):
    """A new depth mixer for the registry test: adds the mean over the volume's slices (shape kept)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor, depth: int) -> torch.Tensor:
        v = unfold_depth(x, depth)
        return (v + v.mean(1, keepdim=True) * self.scale).reshape(x.shape)


@pytest.fixture
def depth_mean_kind():
    """The kind "dmean" registered for one test (one class plus one entry), removed afterwards."""
    register_adapter_kind("dmean", AdapterKindSpec("middle", lambda width, depth: _DepthMean(width)))
    yield "dmean"
    del ADAPTER_KINDS["dmean"]


def test_a_registered_adapter_kind_is_built_by_every_network_that_takes_a_kind(depth_mean_kind):
    adapter = Adapter(16, depth_mean_kind, depth=3)
    assert isinstance(adapter.mixer, _DepthMean) and adapter.mixer.scale.shape == (4,)  # on the hidden width
    x = torch.randn(6, 4, 4, 16)
    torch.testing.assert_close(adapter(x, 3), x)  # fc_up starts at zero, as for every kind
    encoder = VolumetricEncoder(16, 2, 2, num_slices=4, grid=8, slice_group=2, window=4, adapter_kind="dmean")
    assert all(isinstance(a.mixer, _DepthMean) for a in encoder.adapters)
    net = SAM3DAdapterNetwork("tiny", 1, 3, (8, 64, 64), 4, 4, SAM3DAdapterOptions(adapter=depth_mean_kind))
    assert all(isinstance(a.mixer, _DepthMean) for a in net.encoder.adapters)
    additions = EncoderAdditions(16, num_blocks=2, depth=3, kind=depth_mean_kind)  # MaskSAM, Self-Prompt-SAM
    assert sum(isinstance(m, _DepthMean) for m in additions.modules()) == 2 * 2  # two adapters per block
    with pytest.raises(ValueError, match="already registered"):
        register_adapter_kind(depth_mean_kind, AdapterKindSpec("middle", lambda width, depth: _DepthMean(width)))


def test_an_unknown_adapter_kind_names_the_registered_ones():
    with pytest.raises(ValueError, match="Unknown adapter kind 'dcnv' .*vanilla, dmlp, dconv"):
        Adapter(16, "dcnv")
    assert SAM3DAdapterOptions().adapter == "dconv"  # the method's adapter, as before the option existed


# ---- other methods' adapters (3DSAM-adapter's comparison rows) ------------------------------------------------------
def test_st_adapter_starts_as_identity_and_mixes_depth_neighbours_at_the_same_position():
    """ST-Adapter's depth-wise (3, 1, 1) convolution: a token reaches its two depth neighbours at the same in-plane
    position (all channels through the projections), nothing else, and no other volume."""
    from nnunet_sam.blocks.st_adapter import STAdapter

    volumes, depth = 2, 5
    x = torch.randn(volumes * depth, 6, 6, 8)
    adapter = STAdapter(8)
    torch.testing.assert_close(adapter(x, depth), x)  # the convolution starts at zero
    _randomise(adapter)
    y = x.clone()
    y[2, 3, 3] += 1.0  # volume 0, depth 2, token (3, 3)
    diff = (adapter(y, depth) - adapter(x, depth)).abs().sum(-1).view(volumes, depth, 6, 6) > 1e-6
    expected = torch.zeros_like(diff)
    expected[0, 1:4, 3, 3] = True
    assert torch.equal(diff, expected)


def test_med_adapter_reach_and_stage_to_stage_carry():
    """Med-Adapter: identity at start; its (5, 5, 5) largest scale bounds what one token reaches; an inter-stage
    adapter merges the carry and hands on its own, the others pass it unchanged."""
    from nnunet_sam.blocks.med_adapter import MedAdapter

    volumes, depth, dim = 2, 7, 12
    x = torch.randn(volumes * depth, 8, 8, dim)
    plain, linked = MedAdapter(dim, 0.5), MedAdapter(dim, 0.5, inter_stage=True)
    torch.testing.assert_close(linked(x, depth)[0], x)
    for adapter in (plain, linked):
        _randomise(adapter)
        adapter.eval()  # batch norm with its running statistics: no mixing through batch statistics
    y = x.clone()
    y[3, 4, 4] += 1.0  # volume 0, depth 3, token (4, 4)
    with torch.no_grad():
        out_x, carry = linked(x, depth)
        diff = (linked(y, depth)[0] - out_x).abs().sum(-1).view(volumes, depth, 8, 8) > 1e-6
        assert diff[0, 3, 2:7, 2:7].all() and diff[0, 1:6, 4, 4].all(), "the in-plane and through-plane reach"
        assert not diff[1].any() and not diff[0, 0].any() and not diff[0, :, 7].any(), "beyond the largest kernel"
        assert carry.shape == (volumes, dim // 2, depth, 8, 8)
        other = torch.randn_like(carry)
        assert not torch.allclose(linked(x, depth, other)[0], out_x), "the previous stage must reach the output"
        out_plain, passed = plain(x, depth, other)
        assert passed is other and torch.equal(out_plain, plain(x, depth, None)[0])


def test_med_adapter_batch_norm_statistics_are_updated_once_per_step_under_checkpointing(monkeypatch):
    """A checkpointed block runs its forward again in backward; the Med-Adapter's batch norms must not update their
    running statistics twice (checkpointing changes memory, never what is computed or learnt)."""
    import copy

    from nnunet_sam.blocks import med_adapter
    from nnunet_sam.blocks.checkpointing import block_checkpointing, run_block_unit

    adapter = med_adapter.MedAdapter(12, 0.5, inter_stage=True)
    _randomise(adapter)
    reference = copy.deepcopy(adapter)
    x = torch.randn(2 * 4, 6, 6, 12, requires_grad=True)
    run_block_unit(reference, x, 4)[0].square().sum().backward()
    with block_checkpointing():
        run_block_unit(adapter, x, 4)[0].square().sum().backward()
    for (name, ours), theirs in zip(adapter.named_buffers(), reference.buffers()):
        assert torch.equal(ours, theirs), name
    monkeypatch.setattr(med_adapter, "recomputing", lambda: False)  # without the guard: updated twice
    with block_checkpointing():
        run_block_unit(adapter, x, 4)[0].square().sum().backward()
    run_block_unit(reference, x, 4)[0].square().sum().backward()
    assert not torch.equal(adapter.scales[0][2].running_mean, reference.scales[0][2].running_mean)
