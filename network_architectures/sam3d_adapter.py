"""3DSAM-adapter: SAM made volumetric, automatic or prompted with 3D points.

Composition only: a plain stem (channel mean repeated to 3; no learned modality mapping, as in the method),
SAM's frozen image encoder run on a 3D token grid by :class:`VolumetricEncoder`, an optional
:class:`PointPromptEncoder` (visual sampler + global queries), and the lightweight 3D CNN
:class:`AggregatingMaskDecoder3D`. SAM's own prompt encoder and mask decoder are kept under ``self.sam`` (frozen,
unused) only so that the trainer loads the official checkpoint unchanged.

Trainable: the encoder additions (slice grouping conv, depth embedding, depth relative-position offsets,
adapters, with ``neck="3d"`` the 3D necks), the LayerNorms of SAM's image encoder, the point prompt encoder and the
mask decoder. :data:`PAPER_CAPACITY` builds the public code's network (adapters at half width, 3D necks, two-way
prompt encoder, multi-level head): 25.5 M trainable parameters at ViT-B against the paper's 25.46 M.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.backbones.sam_vit import BackboneSpec, build_sam, get_backbone
from nnunet_sam.blocks.adapters import AdapterKind
from nnunet_sam.blocks.mask_decoder_3d import AggregatingMaskDecoder3D, MultiLevelMaskDecoder3D
from nnunet_sam.blocks.stem import PlainStem
from nnunet_sam.blocks.volumetric_encoder import VolumetricEncoder
from nnunet_sam.prompting.point_sampler import PointPromptEncoder, TwoWayPointPromptEncoder


@dataclass(frozen=True)
class SAM3DAdapterOptions:
    """Network options (class attribute ``options`` of a 3DSAM-adapter trainer, saved in the model's record).

    ``prompted``: with the point prompt encoder (clicks), or fully automatic. ``adapter``: the adapter kind of
    every encoder block (:data:`~nnunet_sam.blocks.adapters.ADAPTER_KINDS`; the method's DConv adapter), another
    method's adapter (:data:`~nnunet_sam.blocks.volumetric_encoder.BLOCK_ADAPTERS`: ``"st_adapter"``,
    ``"med_adapter"``), None for none. ``tune_encoder``: train every weight of SAM's image encoder (full
    fine-tuning; its 2D neck stays frozen where ``neck="3d"`` replaces it).

    Capacity (defaults: this package's lighter network, 6.5 M trainable parameters at ViT-B; :data:`PAPER_CAPACITY`
    sets the public code's, 25.46 M as the paper reports): ``adapter_ratio`` (adapter hidden width / embedding
    width; public code 0.5); ``neck`` "sam" (SAM's frozen 2D neck) or "3d" (a trainable 3D neck per feature level);
    ``decoder`` "aggregating" (:class:`AggregatingMaskDecoder3D`) or "multilevel" (:class:`MultiLevelMaskDecoder3D`,
    needs ``neck="3d"``); ``prompt_encoder`` "cross" (:class:`PointPromptEncoder`, one cross-attention layer) or
    "two_way" (:class:`TwoWayPointPromptEncoder`, SAM's two-way transformer, depth 2). ``prompt_levels``: the
    feature levels (1-4, 4 = the final embedding) that a prompt encoder of its own conditions on the points (the
    paper's feature-level ablation; levels below 4 need ``neck="3d"``).

    Ablations of the paper: ``aggregation`` False (the multi-level head reads the final embedding alone, no
    intermediate necks: "effects of multi-layer aggregation"); ``point_embedding`` "positional" (the two-way prompt
    encoder's point tokens encode the point's position instead of sampling the image feature there: "visual sampler
    v.s. positional encoding").
    """

    prompted: bool = False
    adapter: AdapterKind | None = "dconv"
    adapter_ratio: float = 0.25
    neck: str = "sam"
    decoder: str = "aggregating"
    prompt_encoder: str = "cross"
    prompt_levels: tuple[int, ...] = (4,)
    tune_encoder: bool = False
    aggregation: bool = True
    point_embedding: str = "sampler"


# The public code's network (the paper's 25.46 M trainable parameters, 15.21 M of them in the image encoder).
PAPER_CAPACITY = {"adapter_ratio": 0.5, "neck": "3d", "decoder": "multilevel", "prompt_encoder": "two_way"}

# The paper's (poster's) ablation rows, each the options of one trainer on top of a paper preset (trainers module).
# Comparison with other adaptations, fully automatic (the prompt encoder discarded): the paper's network with its
# adapters replaced, each adapter at the half width of the paper's own. "Pro-tuning" is not offered (docs/presets.md).
ADAPTATION_ROWS: dict[str, SAM3DAdapterOptions] = {
    "houlsby": SAM3DAdapterOptions(**PAPER_CAPACITY, adapter="vanilla"),  # "Adapter (ICML 2019)"
    "stAdapter": SAM3DAdapterOptions(**PAPER_CAPACITY, adapter="st_adapter"),  # "ST-Adapter (NeurIPS 2022)"
    "medTuning": SAM3DAdapterOptions(**PAPER_CAPACITY, adapter="med_adapter"),  # "Med-tuning (arXiv 2023)"
    "fullFT": SAM3DAdapterOptions(**PAPER_CAPACITY, adapter=None, tune_encoder=True),  # "Full fine-tuning"
}
# Point-prompt ablations: the feature levels of the prompt encoders ("all four", and the final level with one other,
# the poster's two-level rows as read here), the visual sampler replaced by a positional encoding, and the head
# without multi-layer aggregation.
PROMPT_ROWS: dict[str, SAM3DAdapterOptions] = {
    "allLevels": SAM3DAdapterOptions(prompted=True, **PAPER_CAPACITY, prompt_levels=(1, 2, 3, 4)),
    **{f"levels{k}4": SAM3DAdapterOptions(prompted=True, **PAPER_CAPACITY, prompt_levels=(k, 4)) for k in (1, 2, 3)},
    "positional": SAM3DAdapterOptions(prompted=True, **PAPER_CAPACITY, point_embedding="positional"),
    "noAggregation": SAM3DAdapterOptions(prompted=True, **PAPER_CAPACITY, aggregation=False),
}


class SAM3DAdapterNetwork(nn.Module):
    """Input (B, M, D, P, P) -> class logits (B, C, D, P, P); SAM sees every slice at ``sam_input_size`` px.

    ``forward(x, points=None, labels=None)``: points (B, K, 3) voxel (z, y, x) of the patch with labels (B, K)
    (class k >= 1, 0 background, -1 padding) for a prompted network (none: global queries only). With
    ``return_all`` (default: in training mode) forward returns {"aux": [], "logits": ..., "semantic": ...}
    (the layout of :class:`~nnunet_sam.losses.segmentation.DeepSupervisedSegLoss`).
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        slice_group: int,
        window: int,
        options: SAM3DAdapterOptions | None = None,
        sam_input_size: int | None = None,
        attention: AttentionImpl = DEFAULT_ATTENTION,
    ) -> None:
        super().__init__()
        self.options = options = options or SAM3DAdapterOptions()
        assert len(patch_size) == 3, f"3DSAM-adapter needs a 3D patch [D, P, P], got {tuple(patch_size)}"
        assert patch_size[-1] == patch_size[-2], f"in-plane patch must be square, got {tuple(patch_size)}"
        self.spec = spec = get_backbone(backbone)
        if not isinstance(spec, BackboneSpec):
            raise ValueError(
                f"3DSAM-adapter runs SAM's ViT on a 3D token grid; backbone '{backbone}' is not a SAM ViT."
            )
        self.patch = tuple(int(s) for s in patch_size)
        # SAM input size S (None: P): every slice is interpolated from P to S px before the frozen patch embedding
        # (the public code feeds its 128^3 crops at x4, one token = 4x4 voxels); the token grid is S / ViT patch.
        size = int(sam_input_size or self.patch[-1])
        grid = size // spec.patch_size
        self.sam = build_sam(spec, size)
        self.sam.requires_grad_(False)
        if options.tune_encoder:  # full fine-tuning (SAM's 2D neck is not run with 3D necks: it stays frozen)
            self.sam.image_encoder.requires_grad_(True)
            self.sam.image_encoder.neck.requires_grad_(options.neck != "3d")
        for name, module in self.sam.image_encoder.named_modules():  # the method tunes the encoder's norms
            if name.startswith("neck") and options.neck == "3d":
                continue  # SAM's 2D neck is not run: its norms stay frozen
            if isinstance(module, nn.LayerNorm) or type(module).__name__ == "LayerNorm2d":
                module.requires_grad_(True)
        self.stem = PlainStem(self.patch[-1], size)
        assert options.neck in ("sam", "3d") and options.decoder in ("aggregating", "multilevel"), options
        assert options.prompt_encoder in ("cross", "two_way"), options
        assert options.decoder == "aggregating" or options.neck == "3d", "the multilevel decoder needs neck='3d'"
        assert options.aggregation or options.decoder == "multilevel", "aggregation=False is an option of 'multilevel'"
        assert options.point_embedding == "sampler" or options.prompt_encoder == "two_way", (
            "point_embedding='positional' is an option of the two-way prompt encoder"
        )
        # without multi-layer aggregation only the final level is read: no intermediate necks are built
        feature_indices = spec.feature_indices if options.aggregation else spec.feature_indices[-1:]
        self.encoder = VolumetricEncoder(
            spec.embed_dim,
            spec.num_heads,
            spec.depth,
            self.patch[0],
            grid,
            slice_group,
            window,
            feature_indices,
            adapter_ratio=options.adapter_ratio,
            attention=attention,
            adapter_kind=options.adapter,
            neck_dim=spec.prompt_dim if options.neck == "3d" else None,
        )
        levels = tuple(options.prompt_levels)
        assert levels and set(levels) <= {1, 2, 3, 4}, f"prompt_levels must be among 1-4, got {levels}"
        assert levels == (4,) or options.neck == "3d", "prompt encoders below level 4 need neck='3d'"
        assert levels == (4,) or options.aggregation, "prompt encoders below level 4 need the aggregated levels"

        def prompt_encoder() -> nn.Module:
            if options.prompt_encoder == "two_way":
                return TwoWayPointPromptEncoder(
                    spec.prompt_dim,
                    num_classes,
                    num_heads=spec.decoder_heads,
                    mlp_dim=spec.decoder_mlp_dim,
                    point_embedding=options.point_embedding,
                )
            return PointPromptEncoder(spec.prompt_dim, num_classes, num_heads=spec.decoder_heads)

        self.prompt_encoder = prompt_encoder() if options.prompted and 4 in levels else None
        self.level_prompt_encoders = nn.ModuleDict(
            {str(k): prompt_encoder() for k in sorted(levels) if k < 4} if options.prompted else {}
        )
        self.decoder: nn.Module
        if options.decoder == "multilevel":
            self.decoder = MultiLevelMaskDecoder3D(spec.prompt_dim, len(feature_indices), in_channels, num_classes)
        else:
            self.decoder = AggregatingMaskDecoder3D(
                spec.prompt_dim,
                spec.embed_dim,
                len(spec.feature_indices),
                num_classes,
                num_stages=max(1, round(math.log2(self.patch[-1] / grid))),  # x2 steps from the token grid to P
            )

    def forward(
        self,
        x: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_all: bool | None = None,
    ) -> torch.Tensor | dict:
        return_all = self.training if return_all is None else return_all
        b, m, d, h, w = x.shape
        assert (d, h, w) == self.patch, f"input patch {(d, h, w)} != network patch {self.patch}"
        slices = self.stem(x.transpose(1, 2).reshape(b * d, m, h, w))  # (B * D, 3, S, S)
        slices = slices.reshape(b, d, 3, *slices.shape[-2:]).transpose(1, 2)
        embedding, features = self.encoder(self.sam.image_encoder, slices)
        if self.options.prompted:
            points = None if points is None else points.to(x.device)
            labels = None if labels is None else labels.to(x.device)
            if self.prompt_encoder is not None:
                embedding = self.prompt_encoder(embedding, points, labels, self.patch)
            features = [
                self.level_prompt_encoders[str(k)](f, points, labels, self.patch)
                if str(k) in self.level_prompt_encoders
                else f
                for k, f in enumerate(features, start=1)
            ]
        else:
            assert points is None, "this network was built without a prompt encoder (automatic mode)"
        if self.options.decoder == "multilevel":
            logits = self.decoder([*features, embedding], x, self.patch)
        else:
            logits = self.decoder(embedding, features, self.patch)
        outputs = {"aux": [], "logits": logits, "semantic": logits}
        return outputs if return_all else logits
