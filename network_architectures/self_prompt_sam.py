"""Self-Prompt-SAM: SAM prompted by its own multi-scale auxiliary masks, one decoder row per class.

Composition only: an MAdapter stem (or a plain one), SAM's frozen image encoder with DFused (depth-MLP)
adapters, the MSPGenerator (deeply supervised auxiliary class masks), prompts per foreground class taken from
its auxiliary mask (box, most interior point, the mask itself), SAM's frozen prompt encoder and mask decoder
with adapters, and the MC-Adapter from the per-class binary logits to multi-class logits.
Decoder rows are ordered (volume, class, slice) with the slice fastest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sam.backbones.sam_vit import build_sam, get_backbone
from nnunet_sam.blocks.adapters import AdapterKind
from nnunet_sam.blocks.injection import DecoderAdditions, EncoderAdditions
from nnunet_sam.blocks.mc_adapter import MCAdapter, binary_to_multiclass
from nnunet_sam.blocks.stem import ModalityStem, PlainStem
from nnunet_sam.prompting.from_masks import box_prompts, point_prompts
from nnunet_sam.prompting.generators import FeaturePyramidDecoder, MultiScaleMaskGenerator


@dataclass(frozen=True)
class SelfPromptSAMOptions:
    """Switches of the paper's ablation (Table 3); the defaults are the full model S9.

    S1: generator="stacked", adapter=None, depth_embedding=False, madapter=False, mc_adapter=False.
    S2: S1 with generator="multiscale". S3: S2 + adapter="vanilla". S6: adapter="dmlp" (DFusedAdapter).
    S7: S6 + depth_embedding. S8: S7 + madapter. S9: S8 + mc_adapter. (S4/S5, depth MLPs before/after a
    vanilla adapter, are not implemented.)
    """

    generator: Literal["multiscale", "stacked"] = "multiscale"
    adapter: AdapterKind | None = "dmlp"
    depth_embedding: bool = True
    madapter: bool = True
    mc_adapter: bool = True
    gradient_checkpointing: bool = False


class SelfPromptSAMNetwork(nn.Module):
    """Input (B, M, D, P, P) (or (B, M, P, P) for 2d); output multi-class logits (B, C, D, P, P).

    ``decode = False`` (training stage 1) skips the prompt encoder and mask decoder. With ``return_all`` (or
    in training mode) forward returns a dict: "aux" list of per-level class logits (B, C, D, r, r) coarse to
    fine, and in stage 2 "binary" (B, D, C - 1, P, P) per-class logits and "logits" (B, C, D, P, P);
    "semantic" holds the logits nnU-Net sees ((B, C, P, P) for 2d).
    """

    def __init__(
        self,
        backbone: str,
        in_channels: int,
        num_classes: int,
        patch_size: Sequence[int],
        sam_input_size: int,
        options: SelfPromptSAMOptions | None = None,
    ) -> None:
        super().__init__()
        spec = get_backbone(backbone)
        options = options or SelfPromptSAMOptions()
        assert num_classes >= 2, "Self-Prompt-SAM needs background and at least one foreground class"
        assert patch_size[-1] == patch_size[-2], f"in-plane patch must be square, got {tuple(patch_size)}"
        self.options = options
        self.is_2d = len(patch_size) == 2
        self.depth = 1 if self.is_2d else int(patch_size[0])
        self.patch = int(patch_size[-1])
        self.input_size = sam_input_size
        self.num_classes = num_classes
        self.decode = True

        self.sam = build_sam(spec, sam_input_size)
        self.sam.requires_grad_(False)
        self.stem = (
            ModalityStem(in_channels, self.patch, sam_input_size)
            if options.madapter
            else PlainStem(self.patch, sam_input_size)
        )
        self.encoder_additions = EncoderAdditions(
            spec.embed_dim,
            spec.depth,
            self.depth,
            kind=options.adapter,
            depth_embedding=options.depth_embedding,
            feature_indices=spec.feature_indices,
            gradient_checkpointing=options.gradient_checkpointing,
        )
        num_features = len(spec.feature_indices) if options.generator == "multiscale" else 0
        pyramid = FeaturePyramidDecoder(spec.embed_dim, spec.prompt_dim, num_features, spec.patch_size, spec.prompt_dim)
        self.generator = MultiScaleMaskGenerator(pyramid, num_classes)
        self.decoder_additions = DecoderAdditions(
            spec.prompt_dim,
            len(self.sam.mask_decoder.transformer.layers),
            self.depth,
            token_kind=options.adapter,
            image_kind=options.adapter,
            depth_embedding=options.depth_embedding,
        )
        self.mc_adapter = MCAdapter(num_classes - 1) if options.mc_adapter else None

    def prompt_generation_modules(self) -> list[nn.Module]:
        """The modules that train in stage 1 (everything upstream of the auxiliary masks)."""
        return [self.stem, self.encoder_additions, self.generator]

    def forward(self, x: torch.Tensor, return_all: bool | None = None) -> torch.Tensor | dict:
        return_all = self.training if return_all is None else return_all
        if x.dim() == 4:
            assert self.is_2d, f"this network was built for 3D patches, got a 2D input {tuple(x.shape)}"
            x = x[:, :, None]
        b, _, d, h, w = x.shape
        assert (d, h, w) == (self.depth, self.patch, self.patch), (
            f"input patch {(d, h, w)} != network patch {(self.depth, self.patch, self.patch)}"
        )
        p, k = self.patch, self.num_classes - 1

        slices = x.permute(0, 2, 1, 3, 4).reshape(b * d, -1, h, w)
        embedding, features = self.encoder_additions(self.sam.image_encoder, self.stem(slices))
        aux = self.generator(embedding, features)  # [(B * D, C, r, r)] coarse to fine

        def to_volume(t: torch.Tensor) -> torch.Tensor:  # (B * D, C, ...) -> (B, C, D, ...)
            return t.reshape(b, d, *t.shape[1:]).transpose(1, 2)

        outputs: dict = {"aux": [to_volume(a) for a in aux]}
        finest = aux[-1] if aux[-1].shape[-1] == p else F.interpolate(aux[-1], size=(p, p), mode="bilinear")
        semantic = to_volume(finest)
        if self.decode:
            binary, logits = self._decode(embedding, aux[-1], b, d)  # (B * D, K, P, P), (B * D, C, P, P)
            outputs["binary"] = binary.reshape(b, d, k, p, p)
            semantic = outputs["logits"] = to_volume(logits)
        outputs["semantic"] = semantic[:, :, 0] if self.is_2d else semantic
        return outputs if return_all else outputs["semantic"]

    def _decode(self, embedding: torch.Tensor, aux: torch.Tensor, b: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt SAM with every foreground class's auxiliary mask; rows (B, K, D), slice fastest."""
        k, p = self.num_classes - 1, self.patch
        prompt_encoder, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        # foreground class c against the rest: log p_c - log(1 - p_c), as SAM-style mask logits
        log_p = torch.log_softmax(aux.float(), dim=1)[:, 1:]
        class_logits = log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))  # (B * D, K, S, S)
        low_res = F.interpolate(class_logits, size=prompt_encoder.mask_input_size, mode="bilinear")

        def to_rows(t: torch.Tensor) -> torch.Tensor:  # (B * D, K, ...) -> (B * K * D, ...)
            return t.reshape(b, d, k, *t.shape[2:]).transpose(1, 2).reshape(b * k * d, *t.shape[2:])

        boxes = box_prompts(None, low_res, source="mask") * self.input_size  # empty mask -> whole image
        points, labels = point_prompts(low_res, self.input_size)  # empty mask -> padding point (label -1)
        sparse, dense = prompt_encoder(
            points=(to_rows(points)[:, None], to_rows(labels)[:, None]),
            boxes=to_rows(boxes),
            masks=to_rows(low_res)[:, None].to(embedding.dtype),
        )
        rows = b * k * d
        image = embedding.reshape(b, 1, d, *embedding.shape[1:]).expand(b, k, d, *embedding.shape[1:])
        image = image.reshape(rows, *embedding.shape[1:]) + dense
        image_pe = self.decoder_additions.image_pe(prompt_encoder.get_dense_pe(), rows)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(rows, -1, -1).to(sparse.dtype), sparse], dim=1)
        tokens_out, upscaled = self.decoder_additions(decoder, image, image_pe, tokens)
        hyper = decoder.output_hypernetworks_mlps[0](tokens_out[:, 1])  # first mask token: single-mask output
        masks = (hyper[:, None] @ upscaled.flatten(2)).view(rows, 1, *upscaled.shape[-2:])
        masks = F.interpolate(masks, size=(p, p), mode="bilinear", align_corners=False)
        binary = masks.reshape(b, k, d, p, p).transpose(1, 2).reshape(b * d, k, p, p)
        logits = self.mc_adapter(binary) if self.mc_adapter is not None else binary_to_multiclass(binary)
        return binary, logits
