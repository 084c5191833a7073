"""Semantic segmentation on a ViT: the backbone's patch-grid features and a decoder that recovers the image's shape.

* ``pup``: SETR's progressive upsampling (Zheng et al., arXiv 2012.15840): from the last block's (B, C, H/p, W/p)
  grid, repeated [3x3 conv, GroupNorm, GELU, 2x bilinear upsample] until the input resolution, then a 1x1 classifier.
  GroupNorm rather than BatchNorm: a prediction never depends on what else is in the batch (served batching on/off
  give the same masks) and workers need no synchronised statistics.
* ``linear``: the baseline: LayerNorm'd patch features, a 1x1 classifier on the grid, bilinear upsampling of the
  logits (SETR-Naive / Segmenter's linear decoder).

The backbone is a timm ``VisionTransformer`` without classifier, features from ``forward_intermediates``, so any
classification export or timm checkpoint initialises it (its head is dropped).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbone_hooks import BackboneHooks

__all__ = ["SegmentationViT", "PupDecoder", "LinearDecoder"]


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class PupDecoder(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, patch: int, channels: int = 64):
        super().__init__()
        stages = max(1, math.ceil(math.log2(patch)))
        layers, dim = [], in_dim
        for _ in range(stages):
            layers.append(nn.Sequential(nn.Conv2d(dim, channels, 3, padding=1, bias=False),
                                        nn.GroupNorm(_groups(channels), channels), nn.GELU()))
            dim = channels
        self.stages = nn.ModuleList(layers)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = grid
        for stage in self.stages:
            x = stage(x)
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if tuple(x.shape[-2:]) != tuple(size):  # patch sizes that are not powers of two
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.classifier(x)


class LinearDecoder(nn.Module):
    def __init__(self, in_dim: int, num_classes: int, patch: int, channels: int = 0):
        super().__init__()
        self.norm = nn.GroupNorm(1, in_dim)  # LayerNorm over the channels of each position
        self.classifier = nn.Conv2d(in_dim, num_classes, 1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.classifier(self.norm(grid)), size=size, mode="bilinear", align_corners=False)


DECODERS = {"pup": PupDecoder, "linear": LinearDecoder}


class SegmentationViT(BackboneHooks, nn.Module):
    """(B, 3, H, W) -> (B, num_classes, H, W) logits. ``backbone`` is a timm ViT with ``num_classes=0``."""

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = "pup", channels: int = 64):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.backbone = backbone
        patch = int(backbone.patch_embed.patch_size[0])
        self.decoder = DECODERS[decoder](backbone.embed_dim, num_classes, patch, channels)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.backbone.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW",
                                                   intermediates_only=True)[-1]
        return self.decoder(grid, tuple(x.shape[-2:]))
