"""Self-Prompt-SAM: SAM prompted by its own multi-scale auxiliary masks, one decoder row per class.

Composition only: an MAdapter stem (or a plain one), SAM's frozen image encoder with DFused (depth-MLP)
adapters, the MSPGenerator (deeply supervised auxiliary class masks), prompts per class (background included by
default) taken from its auxiliary mask (box, most interior point, the mask itself), SAM's frozen prompt encoder
and mask decoder with adapters, and the MC-Adapter from the per-class binary logits to multi-class logits.
Decoder rows are ordered (volume, class, slice) with the slice fastest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_sam.backbones.attention import DEFAULT_ATTENTION, AttentionImpl
from nnunet_sam.blocks.adapters import AdapterKind
from nnunet_sam.blocks.folded_sam import FoldedSAM, SAMAdditions
from nnunet_sam.blocks.mc_adapter import MCAdapter, binary_to_multiclass
from nnunet_sam.prompting.from_masks import MaskPromptResize, box_prompts, point_prompts, prompt_mask
from nnunet_sam.prompting.generators import FeaturePyramidDecoder, MultiScaleMaskGenerator


@dataclass(frozen=True)
class SelfPromptSAMOptions:
    """Switches of the paper's ablation (Table 3); the defaults are the full model S9.

    ``ABLATION_ROWS`` below spells out every row S1-S9 (trainers ``SelfPromptSAMTrainer_S1`` ... ``_S9``).
    ``prompt_background``: prompt SAM for background too, as the paper does (Fig. 3b: one output per class,
    background included), so the decoder gives C binary masks that become the C multi-class logits; False prompts the
    foreground classes only and gives background a fixed logit of 0 (models saved before the option existed).
    ``mask_prompt_resize``: how the auxiliary masks shrink to SAM's mask-prompt size (:func:`prompt_mask`); "area"
    keeps every class present at full resolution present in its mask, box and point prompts.
    """

    generator: Literal["multiscale", "stacked"] = "multiscale"
    adapter: AdapterKind | None = "dmlp"
    depth_embedding: bool = True
    madapter: bool = True
    mc_adapter: bool = True
    gradient_checkpointing: bool = False
    prompt_background: bool = field(default=True, metadata={"legacy": False})
    mask_prompt_resize: MaskPromptResize = field(default="area", metadata={"legacy": "bilinear"})


_S2 = {"generator": "multiscale", "adapter": None, "depth_embedding": False, "madapter": False, "mc_adapter": False}

# Table 3 of the paper (ACDC). vAdapter = vanilla adapter, DFusedAdapter = depth MLP in the middle of the adapter,
# DPosEmbed = depth positional embeddings, MAdapter = learned modality stem, MC-Adapter = binary -> multi-class convs.
ABLATION_ROWS: dict[str, SelfPromptSAMOptions] = {
    name: SelfPromptSAMOptions(**kwargs)
    for name, kwargs in {
        "S1": {**_S2, "generator": "stacked"},  # SAM + stacked CNN prompt generator, no adapters
        "S2": _S2,  # SAM + MSPGenerator
        "S3": {**_S2, "adapter": "vanilla"},  # + vAdapter
        "S4": {**_S2, "adapter": "dmlp_before"},  # + vAdapter with depth MLPs before it
        "S5": {**_S2, "adapter": "dmlp_after"},  # + vAdapter with depth MLPs after it
        "S6": {**_S2, "adapter": "dmlp"},  # + DFusedAdapter
        "S7": {**_S2, "adapter": "dmlp", "depth_embedding": True},  # + DPosEmbed
        "S8": {**_S2, "adapter": "dmlp", "depth_embedding": True, "madapter": True},  # + MAdapter
        "S9": {},  # + MC-Adapter: the full model
    }.items()
}


def class_prompts(
    aux: torch.Tensor, size: int, image_size: int, background: bool, resize: MaskPromptResize = "area"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class prompts from the generator's finest class logits.

    Class c is scored against the rest, ``log p_c - log(1 - p_c)`` with p the softmax over classes, as SAM-style mask
    logits; the mask prompt is their reduction to ``size`` (:func:`prompt_mask`), the box its bounding box (the whole
    image where it is empty) and the point its most interior pixel (a padding point, label -1, where it is empty).

    Arguments:
      aux (Tensor): (S, C, H, W) class logits.
      size (int): SAM's mask-prompt size. image_size (int): SAM's input size (box and point frame).
      background (bool): prompt background (class 0) too; otherwise classes 1..C-1 only.

    Returns:
      masks (S, K, size, size), boxes (S, K, 4) in pixels of the input frame, points (S, K, 2), labels (S, K); K = C
      with background, C - 1 without.
    """
    log_p = torch.log_softmax(aux.float(), dim=1)[:, 0 if background else 1 :]
    class_logits = log_p - torch.log1p(-log_p.exp().clamp(max=1 - 1e-6))  # (S, K, H, W)
    masks = prompt_mask(class_logits, size, resize)
    boxes = box_prompts(None, masks, source="mask") * image_size  # empty mask -> whole image
    points, labels = point_prompts(masks, image_size)  # empty mask -> padding point (label -1)
    return masks, boxes, points, labels


class SelfPromptSAMNetwork(FoldedSAM):
    """Input (B, M, D, P, P) (or (B, M, P, P) for 2d); output multi-class logits (B, C, D, P, P).

    ``forward(x, return_all=None, run_decoder=True)``: ``run_decoder=False`` (training stage 1) skips the prompt
    encoder and mask decoder. With ``return_all`` (or in training mode) forward returns a dict: "aux" list of
    per-level class logits (B, C, D, r, r) coarse to fine, and with the decoder "binary" (B, D, K, P, P) per-class
    logits (K = ``num_prompts``: C, or C - 1 without the background prompt) and "logits" (B, C, D, P, P);
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
        kind = options.adapter  # one adapter kind in the encoder and on both sides of the decoder
        additions = SAMAdditions(
            kind, kind, kind, options.depth_embedding, options.madapter, options.gradient_checkpointing
        )
        super().__init__(backbone, in_channels, patch_size, sam_input_size, additions, attention)
        self.options = options
        self.num_classes = num_classes
        spec = self.spec
        num_features = len(spec.feature_indices) if options.generator == "multiscale" else 0
        pyramid = FeaturePyramidDecoder(
            spec.feature_dims, spec.prompt_dim, num_features, spec.patch_size, spec.prompt_dim
        )
        self.generator = MultiScaleMaskGenerator(pyramid, num_classes)
        self.num_prompts = num_classes if options.prompt_background else num_classes - 1
        self.mc_adapter = (
            MCAdapter(num_classes - 1, background_prompted=options.prompt_background) if options.mc_adapter else None
        )

    def prompt_generation_modules(self) -> list[nn.Module]:
        """The modules that train in stage 1 (everything upstream of the auxiliary masks)."""
        return [self.stem, self.encoder_additions, self.generator]

    def forward(self, x: torch.Tensor, return_all: bool | None = None, run_decoder: bool = True) -> torch.Tensor | dict:
        return_all = self.training if return_all is None else return_all
        p, k = self.patch, self.num_prompts
        embedding, features = self.encode(x)
        b, d = embedding.shape[0] // self.depth, self.depth
        aux = self.generator(embedding, features)  # [(B * D, C, r, r)] coarse to fine

        def to_volume(t: torch.Tensor) -> torch.Tensor:  # (B * D, C, ...) -> (B, C, D, ...)
            return t.reshape(b, d, *t.shape[1:]).transpose(1, 2)

        outputs: dict = {"aux": [to_volume(a) for a in aux]}
        finest = aux[-1] if aux[-1].shape[-1] == p else F.interpolate(aux[-1], size=(p, p), mode="bilinear")
        semantic = to_volume(finest)
        if run_decoder:
            binary = self._prompt_and_decode(embedding, aux[-1])  # (B, D, K, P, P)
            logits = binary.reshape(b * d, k, p, p)
            if self.mc_adapter is not None:
                logits = self.mc_adapter(logits)
            elif not self.options.prompt_background:
                logits = binary_to_multiclass(logits)
            outputs["binary"] = binary
            semantic = outputs["logits"] = to_volume(logits)
        outputs["semantic"] = semantic[:, :, 0] if self.is_2d else semantic
        return outputs if return_all else outputs["semantic"]

    def _prompt_and_decode(self, embedding: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Prompt SAM with every prompted class's auxiliary mask (box, interior point, mask).

        aux (B * D, C, S, S) class logits -> per-class binary mask logits (B, D, K, P, P), K = ``num_prompts``.
        """
        k = self.num_prompts
        prompt_encoder = self.sam.prompt_encoder
        masks, boxes, points, labels = class_prompts(
            aux,
            prompt_encoder.mask_input_size[-1],
            self.input_size,
            self.options.prompt_background,
            self.options.mask_prompt_resize,
        )
        sparse, dense = prompt_encoder(
            points=(self.to_rows(points)[:, None], self.to_rows(labels)[:, None]),
            boxes=self.to_rows(boxes),
            masks=self.to_rows(masks)[:, None].to(embedding.dtype),
        )
        decoded, _ = self.decode(embedding, k, sparse, dense)
        return self.from_rows(decoded, k)
