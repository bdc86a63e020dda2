"""The bundled CIFAR-10 ViT: architecture definition shared by training and the model zoo.

A timm ``VisionTransformer`` on 32x32 inputs with 4x4 patches (64 patch tokens + class token),
DeiT-Tiny's width (embed dim 192, 3 heads, MLP ratio 4) and depth 6.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .cifar import MEAN, STD

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

NAME = "cifar10_vit_d6"
CONFIG = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, num_classes=10)
# Evaluation transform of the bundled model: the 32x32 image as is, normalized with CIFAR-10 statistics.
DATA_CONFIG = dict(input_size=(3, 32, 32), interpolation="bicubic", crop_pct=1.0, mean=MEAN, std=STD)


def build(drop_path_rate: float = 0.0, patch_drop_rate: float = 0.0) -> VisionTransformer:
    """The architecture; ``patch_drop_rate`` (timm's PatchDropout, training mode only: a random
    share of the patch tokens is left out of each image) changes training, not the model."""
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(**CONFIG, drop_path_rate=drop_path_rate, patch_drop_rate=patch_drop_rate)
