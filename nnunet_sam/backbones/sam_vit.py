"""SAM ViT backbones built from segment-anything's own modules.

A backbone is described by a :class:`BackboneSpec`; :func:`build_sam` turns a spec into a stock
``segment_anything.modeling.Sam`` (image encoder, prompt encoder, mask decoder) for a chosen input size.
The state dict of that module has exactly the layout of the official checkpoint files, so loading
(:mod:`nnunet_sam.backbones.checkpoints`) needs no key mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture constants of one SAM backbone and the name of its checkpoint file."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    checkpoint_file: str | None
    checkpoint_size: int = 1024  # input size the checkpoint was trained at (pos_embed grid * patch)
    patch_size: int = 16
    window_size: int = 14
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    requires_checkpoint: bool = True

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """Blocks whose outputs feed the prompt generators: every ``depth // 4`` blocks (ViT-B: 2, 5, 8, 11)."""
        step = max(1, self.depth // 4)
        return tuple(range(step - 1, self.depth, step))[-4:]

    @property
    def tile(self) -> int:
        """In-plane size (pixels) of one attention window; patches that are multiples of it need no padding."""
        return self.patch_size * self.window_size


BACKBONES: dict[str, BackboneSpec] = {
    "vit_b": BackboneSpec("vit_b", 768, 12, 12, (2, 5, 8, 11), "sam_vit_b_01ec64.pth"),
    "vit_l": BackboneSpec("vit_l", 1024, 24, 16, (5, 11, 17, 23), "sam_vit_l_0b3195.pth"),
    "vit_h": BackboneSpec("vit_h", 1280, 32, 16, (7, 15, 23, 31), "sam_vit_h_4b8939.pth"),
    "medsam": BackboneSpec("medsam", 768, 12, 12, (2, 5, 8, 11), "medsam_vit_b.pth"),
    # A pipeline check for CPUs: same classes and code path, a few narrow blocks, 8 px patches, 4x4 windows.
    "tiny": BackboneSpec(
        "tiny",
        embed_dim=64,
        depth=4,
        num_heads=2,
        global_attn_indexes=(1, 3),
        checkpoint_file="sam_tiny.pth",
        checkpoint_size=128,
        patch_size=8,
        window_size=4,
        prompt_dim=64,
        decoder_mlp_dim=128,
        decoder_heads=2,
        requires_checkpoint=False,
    ),
}


def get_backbone(name: str) -> BackboneSpec:
    """Return the spec called ``name`` or raise a ValueError listing the known backbones."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown SAM backbone '{name}'. Known backbones: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name]


def build_sam(spec: BackboneSpec, input_size: int | None = None) -> Sam:
    """Build a stock SAM with random weights for square inputs of ``input_size`` pixels.

    ``input_size`` defaults to the checkpoint's size; it must be a multiple of ``spec.patch_size``. The image
    embedding grid is ``input_size // patch_size`` and the mask prompt size is four times that grid.
    """
    input_size = spec.checkpoint_size if input_size is None else input_size
    if input_size % spec.patch_size != 0:
        raise ValueError(
            f"SAM input size {input_size} is not a multiple of the {spec.name} patch size {spec.patch_size}."
        )
    grid = input_size // spec.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=input_size,
            patch_size=spec.patch_size,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=4,
            out_chans=spec.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(input_size, input_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_heads,
            ),
            transformer_dim=spec.prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.prompt_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def reference_shapes(spec: BackboneSpec) -> dict[str, torch.Size]:
    """Key -> shape of the official checkpoint layout of ``spec`` (built on the meta device, costs nothing)."""
    with torch.device("meta"):
        sam = build_sam(spec)
    return {k: v.shape for k, v in sam.state_dict().items()}
