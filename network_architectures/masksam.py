"""MaskSAM: prompt-free SAM with mask classification, for 2D and folded-3D patches.

Composition only: a modality stem, SAM's frozen image encoder with depth-aware adapters, MaskSAM's prompt
generator (auxiliary masks, boxes and classifier tokens), SAM's frozen prompt encoder, and SAM's frozen mask
decoder with adapters, learnable global classifier tokens and a class head. Every query of every slice is
one row of a single batched decoder call; rows are ordered (volume, query, slice) with the slice fastest so
depth adapters see neighbouring slices of the same volume and query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.blocks.adapters import AdapterKind
from nnunet_sam.blocks.folded_sam import FoldedSAM, SAMAdditions
from nnunet_sam.losses.mask_classification import semantic_log_probs
from nnunet_sam.prompting.from_masks import BoxSource, MaskPromptResize, box_prompts, prompt_mask
from nnunet_sam.prompting.generators import FeaturePyramidDecoder, MaskBoxPromptGenerator


@dataclass(frozen=True)
class MaskSAMOptions:
    """Switches of the paper's ablation (Table 4); the defaults are the full model B9.

    ``ABLATION_ROWS`` below spells out every row B1-B9 (trainers ``MaskSAMTrainer_B1`` ... ``_B9``).
    ``mask_prompt_resize``: how the auxiliary masks shrink to SAM's mask-prompt size (:func:`prompt_mask`);
    models saved before the option existed used "bilinear", which can drop 1-2 px structures from the prompt.
    """

    box_source: BoxSource = "mean"
    mask_prompt: bool = True
    depth_embedding: bool = True
    encoder_adapter: AdapterKind = "dconv"
    decoder_token_adapter: AdapterKind = "dmlp"
    decoder_image_adapter: AdapterKind = "dconv"
    gradient_checkpointing: bool = False
    mask_prompt_resize: MaskPromptResize = field(default="area", metadata={"legacy": "bilinear"})


def _everywhere(kind: AdapterKind) -> dict:
    return {"encoder_adapter": kind, "decoder_token_adapter": kind, "decoder_image_adapter": kind}


_B4 = {"box_source": "mean", "depth_embedding": False, **_everywhere("vanilla")}

# Table 4 of the paper (ACDC). PG = prompt generator: MaskPG (auxiliary masks; box prompt = their bounding box),
# BBoxPG (learned boxes only), MaskBBoxPG (mask prompt + learned box), MaskAvgBBoxPG (mask prompt + the mean of the
# learned box and the mask's box); vAdapter = vanilla adapter; DPosEmbed = depth positional embeddings.
ABLATION_ROWS: dict[str, MaskSAMOptions] = {
    name: MaskSAMOptions(**kwargs)
    for name, kwargs in {
        "B1": {**_B4, "box_source": "mask"},  # MaskPG + vAdapter
        "B2": {**_B4, "box_source": "learned", "mask_prompt": False},  # BBoxPG + vAdapter
        "B3": {**_B4, "box_source": "learned"},  # MaskBBoxPG + vAdapter
        "B4": _B4,  # MaskAvgBBoxPG + vAdapter
        "B5": {**_B4, "depth_embedding": True},  # B4 + DPosEmbed
        "B6": _everywhere("dmlp_after"),  # B5 with a depth MLP after every adapter's up projection
        "B7": _everywhere("dmlp_before"),  # B5 with a depth MLP before every adapter's down projection
        "B8": _everywhere("dmlp"),  # B5 with DMLPAdapters everywhere
        "B9": {},  # B8 with DConvAdapters on image embeddings (encoder, decoder image->token): the full model
    }.items()
}


class MaskSAMNetwork(FoldedSAM):
    """Input (B, M, D, P, P) (or (B, M, P, P) for 2d); output per-class log-probabilities of the same layout.

    In training mode (or with ``return_all=True``) ``forward`` returns a dict with "pred_logits" (B, D, N,
    C + 1), "pred_masks" and "aux_masks" (B, D, N, P, P) logits, "pred_boxes" (B, D, N, 4) and "semantic"
    (B, C, D, P, P) (D squeezed for 2d). C counts background; class C is "no object".
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        num_classes: int,
        num_queries: int,
        patch_size: Sequence[int],
        sam_input_size: int,
        options: MaskSAMOptions | None = None,
        attention: AttentionImpl = DEFAULT_ATTENTION,
    ) -> None:
        options = options or MaskSAMOptions()
        additions = SAMAdditions(
            options.encoder_adapter,
            options.decoder_token_adapter,
            options.decoder_image_adapter,
            options.depth_embedding,
            learned_stem=True,
            gradient_checkpointing=options.gradient_checkpointing,
        )
        super().__init__(backbone, in_channels, patch_size, sam_input_size, additions, attention)
        self.options = options
        self.num_classes = num_classes
        self.num_queries = num_queries
        spec = self.spec
        pyramid = FeaturePyramidDecoder(
            spec.feature_dims, spec.prompt_dim, len(spec.feature_indices), spec.patch_size, width=spec.prompt_dim
        )
        self.prompt_generator = MaskBoxPromptGenerator(
            pyramid, num_queries, spec.prompt_dim, predict_boxes=options.box_source != "mask"
        )
        self.class_tokens = nn.Embedding(num_queries, spec.prompt_dim)
        self.class_head = nn.Linear(spec.prompt_dim, num_classes + 1)

    def forward(self, x: torch.Tensor, return_all: bool | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        return_all = self.training if return_all is None else return_all
        n, p = self.num_queries, self.patch
        embedding, features = self.encode(x)  # (B * D, C, g, g)
        b, d = embedding.shape[0] // self.depth, self.depth
        proposals = self.prompt_generator(embedding, features)  # masks (B * D, N, S, S)

        prompt_encoder = self.sam.prompt_encoder
        boxes = box_prompts(proposals.boxes, proposals.masks, self.options.box_source)  # (B * D, N, 4)
        mask_prompt = None
        if self.options.mask_prompt:
            size = prompt_encoder.mask_input_size[-1]
            mask_prompt = prompt_mask(proposals.masks, size, self.options.mask_prompt_resize)
            mask_prompt = self.to_rows(mask_prompt)[:, None]
        sparse, dense = prompt_encoder(points=None, boxes=self.to_rows(boxes) * self.input_size, masks=mask_prompt)
        class_tokens = self.to_rows(self.class_tokens.weight + proposals.tokens)[:, None]  # (R, 1, C)
        masks, tokens_out = self.decode(embedding, n, sparse, dense, prefix_tokens=class_tokens)

        pred_masks = self.from_rows(masks, n)  # (B, D, N, P, P)
        pred_logits = self.from_rows(self.class_head(tokens_out[:, 0]), n)  # (B, D, N, C + 1)
        semantic = semantic_log_probs(pred_logits, pred_masks)  # (B, C, D, P, P)
        if self.is_2d:
            semantic = semantic[:, :, 0]
        if not return_all:
            return semantic

        aux = proposals.masks
        if aux.shape[-1] > p:  # SAM input above the patch: average the logits over each patch pixel's area, so
            aux = F.interpolate(aux, size=(p, p), mode="area")  # every logit the prompts read gets a gradient
        elif aux.shape[-1] < p:
            aux = F.interpolate(aux, size=(p, p), mode="bilinear", align_corners=False)
        learned = proposals.boxes if proposals.boxes is not None else boxes
        return {
            "pred_logits": pred_logits,
            "pred_masks": pred_masks,
            "aux_masks": aux.reshape(b, d, n, p, p),
            "pred_boxes": learned.reshape(b, d, n, 4),
            "semantic": semantic,
        }
