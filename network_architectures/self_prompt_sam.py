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

from nnunet_sam.blocks.adapters import AdapterKind
from nnunet_sam.blocks.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.blocks.folded_sam import FoldedSAM
from nnunet_sam.blocks.mc_adapter import MCAdapter, binary_to_multiclass
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


class SelfPromptSAMNetwork(FoldedSAM):
    """Input (B, M, D, P, P) (or (B, M, P, P) for 2d); output multi-class logits (B, C, D, P, P).

    ``run_decoder = False`` (training stage 1) skips the prompt encoder and mask decoder. With ``return_all`` (or
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
        attention: AttentionImpl = DEFAULT_ATTENTION,
    ) -> None:
        options = options or SelfPromptSAMOptions()
        assert num_classes >= 2, "Self-Prompt-SAM needs background and at least one foreground class"
        super().__init__(
            backbone,
            in_channels,
            patch_size,
            sam_input_size,
            encoder_adapter=options.adapter,
            decoder_token_adapter=options.adapter,
            decoder_image_adapter=options.adapter,
            depth_embedding=options.depth_embedding,
            learned_stem=options.madapter,
            gradient_checkpointing=options.gradient_checkpointing,
            attention=attention,
        )
        self.options = options
        self.num_classes = num_classes
        self.run_decoder = True
        spec = self.spec
        num_features = len(spec.feature_indices) if options.generator == "multiscale" else 0
        pyramid = FeaturePyramidDecoder(
            spec.feature_dims, spec.prompt_dim, num_features, spec.patch_size, spec.prompt_dim
        )
        self.generator = MultiScaleMaskGenerator(pyramid, num_classes)
        self.mc_adapter = MCAdapter(num_classes - 1) if options.mc_adapter else None

    def prompt_generation_modules(self) -> list[nn.Module]:
        """The modules that train in stage 1 (everything upstream of the auxiliary masks)."""
        return [self.stem, self.encoder_additions, self.generator]

    def forward(self, x: torch.Tensor, return_all: bool | None = None) -> torch.Tensor | dict:
        return_all = self.training if return_all is None else return_all
        p, k = self.patch, self.num_classes - 1
        embedding, features = self.encode(x)
        b, d = embedding.shape[0] // self.depth, self.depth
        aux = self.generator(embedding, features)  # [(B * D, C, r, r)] coarse to fine

        def to_volume(t: torch.Tensor) -> torch.Tensor:  # (B * D, C, ...) -> (B, C, D, ...)
            return t.reshape(b, d, *t.shape[1:]).transpose(1, 2)

        outputs: dict = {"aux": [to_volume(a) for a in aux]}
        finest = aux[-1] if aux[-1].shape[-1] == p else F.interpolate(aux[-1], size=(p, p), mode="bilinear")
        semantic = to_volume(finest)
        if self.run_decoder:
            binary = self._prompt_and_decode(embedding, aux[-1])  # (B, D, K, P, P)
            logits = binary.reshape(b * d, k, p, p)
            logits = self.mc_adapter(logits) if self.mc_adapter is not None else binary_to_multiclass(logits)
            outputs["binary"] = binary
            semantic = outputs["logits"] = to_volume(logits)
        outputs["semantic"] = semantic[:, :, 0] if self.is_2d else semantic
        return outputs if return_all else outputs["semantic"]

    def _prompt_and_decode(self, embedding: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Prompt SAM with every foreground class's auxiliary mask (box, interior point, mask).

        aux (B * D, C, S, S) class logits -> per-class binary mask logits (B, D, C - 1, P, P).
        """
        k = self.num_classes - 1
        prompt_encoder = self.sam.prompt_encoder
        # foreground class c against the rest, log p_c - log(1 - p_c), as SAM-style mask logits
        log_p = torch.log_softmax(aux.float(), dim=1)[:, 1:]
        class_logits = log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))  # (B * D, K, S, S)
        low_res = F.interpolate(class_logits, size=prompt_encoder.mask_input_size, mode="bilinear")
        boxes = box_prompts(None, low_res, source="mask") * self.input_size  # empty mask -> whole image
        points, labels = point_prompts(low_res, self.input_size)  # empty mask -> padding point (label -1)
        sparse, dense = prompt_encoder(
            points=(self.to_rows(points)[:, None], self.to_rows(labels)[:, None]),
            boxes=self.to_rows(boxes),
            masks=self.to_rows(low_res)[:, None].to(embedding.dtype),
        )
        masks, _ = self.decode(embedding, k, sparse, dense)
        return self.from_rows(masks, k)
