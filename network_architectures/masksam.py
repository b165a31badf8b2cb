"""MaskSAM: prompt-free SAM with mask classification, for 2D and folded-3D patches.

Composition only: a modality stem, SAM's frozen image encoder with depth-aware adapters, MaskSAM's prompt
generator (auxiliary masks, boxes and classifier tokens), SAM's frozen prompt encoder, and SAM's frozen mask
decoder with adapters, learnable global classifier tokens and a class head. Every query of every slice is
one row of a single batched decoder call; rows are ordered (volume, query, slice) with the slice fastest so
depth adapters see neighbouring slices of the same volume and query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.blocks.adapters import AdapterKind
from nnunet_sam.blocks.injection import DecoderAdditions, EncoderAdditions
from nnunet_sam.blocks.stem import ModalityStem
from nnunet_sam.mask_classification import semantic_log_probs
from nnunet_sam.prompting.from_masks import BoxSource, box_prompts
from nnunet_sam.prompting.generators import FeaturePyramidDecoder, MaskBoxPromptGenerator


@dataclass(frozen=True)
class MaskSAMOptions:
    """Switches of the paper's ablation (Table 4); the defaults are the full model B9.

    B1 MaskPG: box_source="mask". B2 BBoxPG: box_source="learned", mask_prompt=False. B3 MaskBBoxPG:
    box_source="learned". B4 MaskAvgBBoxPG: box_source="mean" with vanilla adapters and no depth embedding.
    B5: B4 + depth_embedding. B8: B5 with "dmlp" adapters everywhere. B9: B8 with "dconv" on image tokens.
    """

    box_source: BoxSource = "mean"
    mask_prompt: bool = True
    depth_embedding: bool = True
    encoder_adapter: AdapterKind = "dconv"
    decoder_token_adapter: AdapterKind = "dmlp"
    decoder_image_adapter: AdapterKind = "dconv"
    gradient_checkpointing: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class MaskSAMNetwork(nn.Module):
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
    ) -> None:
        super().__init__()
        spec = get_backbone(backbone)
        options = options or MaskSAMOptions()
        self.options = options
        self.is_2d = len(patch_size) == 2
        self.depth = 1 if self.is_2d else int(patch_size[0])
        self.patch = int(patch_size[-1])
        assert patch_size[-1] == patch_size[-2], f"in-plane patch must be square, got {tuple(patch_size)}"
        self.input_size = sam_input_size
        self.num_classes = num_classes
        self.num_queries = num_queries

        self.sam = build_sam(spec, sam_input_size)
        self.sam.requires_grad_(False)
        self.stem = ModalityStem(in_channels, self.patch, sam_input_size)
        self.encoder_additions = EncoderAdditions(
            spec.embed_dim,
            spec.depth,
            self.depth,
            kind=options.encoder_adapter,
            depth_embedding=options.depth_embedding,
            feature_indices=spec.feature_indices,
            gradient_checkpointing=options.gradient_checkpointing,
        )
        pyramid = FeaturePyramidDecoder(
            spec.embed_dim, spec.prompt_dim, len(spec.feature_indices), spec.patch_size, width=spec.prompt_dim
        )
        self.prompt_generator = MaskBoxPromptGenerator(
            pyramid, num_queries, spec.prompt_dim, predict_boxes=options.box_source != "mask"
        )
        self.decoder_additions = DecoderAdditions(
            spec.prompt_dim,
            len(self.sam.mask_decoder.transformer.layers),
            self.depth,
            token_kind=options.decoder_token_adapter,
            image_kind=options.decoder_image_adapter,
            depth_embedding=options.depth_embedding,
        )
        self.class_tokens = nn.Embedding(num_queries, spec.prompt_dim)
        self.class_head = nn.Linear(spec.prompt_dim, num_classes + 1)

    def forward(self, x: torch.Tensor, return_all: bool | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        return_all = self.training if return_all is None else return_all
        if x.dim() == 4:
            assert self.is_2d, f"this network was built for 3D patches, got a 2D input {tuple(x.shape)}"
            x = x[:, :, None]
        b, _, d, h, w = x.shape
        assert (d, h, w) == (self.depth, self.patch, self.patch), (
            f"input patch {(d, h, w)} != network patch {(self.depth, self.patch, self.patch)}"
        )
        n, p = self.num_queries, self.patch

        # Encoder: (B * D, M, P, P) -> (B * D, 3, S, S) -> embedding (B * D, C, g, g) + block features
        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, -1, h, w)
        embedding, features = self.encoder_additions(self.sam.image_encoder, self.stem(slices))
        proposals = self.prompt_generator(embedding, features)  # masks (B * D, N, S, S)

        def to_rows(t: torch.Tensor) -> torch.Tensor:  # (B * D, N, ...) -> (B * N * D, ...)
            return t.reshape(b, d, n, *t.shape[2:]).transpose(1, 2).reshape(b * n * d, *t.shape[2:])

        def from_rows(t: torch.Tensor) -> torch.Tensor:  # (B * N * D, ...) -> (B, D, N, ...)
            return t.reshape(b, n, d, *t.shape[1:]).transpose(1, 2)

        prompt_encoder = self.sam.prompt_encoder
        boxes = box_prompts(proposals.boxes, proposals.masks, self.options.box_source)  # (B * D, N, 4)
        mask_prompt = None
        if self.options.mask_prompt:
            mask_prompt = F.interpolate(
                proposals.masks, size=prompt_encoder.mask_input_size, mode="bilinear", align_corners=False
            )
            mask_prompt = to_rows(mask_prompt)[:, None]
        sparse, dense = prompt_encoder(points=None, boxes=to_rows(boxes) * self.input_size, masks=mask_prompt)

        rows = b * n * d
        image = embedding.reshape(b, 1, d, *embedding.shape[1:]).expand(b, n, d, *embedding.shape[1:])
        image = image.reshape(rows, *embedding.shape[1:]) + dense
        image_pe = self.decoder_additions.image_pe(prompt_encoder.get_dense_pe(), rows)

        decoder = self.sam.mask_decoder
        class_tokens = to_rows(self.class_tokens.weight + proposals.tokens)[:, None]  # (R, 1, C)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([class_tokens, output_tokens.expand(rows, -1, -1).to(sparse.dtype), sparse], dim=1)
        tokens_out, upscaled = self.decoder_additions(decoder, image, image_pe, tokens)

        hyper = decoder.output_hypernetworks_mlps[0](tokens_out[:, 2])  # first mask token: single-mask output
        masks = (hyper[:, None] @ upscaled.flatten(2)).view(rows, 1, *upscaled.shape[-2:])
        masks = F.interpolate(masks, size=(p, p), mode="bilinear", align_corners=False)
        pred_masks = from_rows(masks[:, 0])  # (B, D, N, P, P)
        pred_logits = from_rows(self.class_head(tokens_out[:, 0]))  # (B, D, N, C + 1)
        semantic = semantic_log_probs(pred_logits, pred_masks)  # (B, C, D, P, P)
        if self.is_2d:
            semantic = semantic[:, :, 0]
        if not return_all:
            return semantic

        aux = proposals.masks
        if aux.shape[-1] != p:
            aux = F.interpolate(aux, size=(p, p), mode="bilinear", align_corners=False)
        learned = proposals.boxes if proposals.boxes is not None else boxes
        return {
            "pred_logits": pred_logits,
            "pred_masks": pred_masks,
            "aux_masks": aux.reshape(b, d, n, p, p),
            "pred_boxes": learned.reshape(b, d, n, 4),
            "semantic": semantic,
        }
