"""The model zoo: which architectures vitray builds, and their size and cost.

vitray adds ViT configs for small images (28x28, 32x32, 64x64) to timm's own registry, so
``timm.create_model("vit_tiny_patch4_32")`` works like any timm name and all of timm's tooling (checkpoint
filters, ``forward_intermediates``, layer grouping for layer decay) applies to them unchanged. Beside those,
every plain timm ViT and DeiT (tiny to huge, patch 8/14/16/32, DeiT distilled) is buildable by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer

__all__ = ["VITRAY_MODELS", "is_model", "list_zoo", "model_info", "ModelInfo"]

_WIDTHS = {  # name: (embed_dim, depth, num_heads)
    "pico": (96, 4, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
}
_GRIDS = {  # suffix: (patch_size, img_size)
    "patch4_28": (4, 28),
    "patch4_32": (4, 32),
    "patch8_64": (8, 64),
}


def _cfg(img_size: int) -> dict:
    return {
        "url": "", "num_classes": 10, "input_size": (3, img_size, img_size), "pool_size": None,
        "crop_pct": 1.0, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
    }


VITRAY_MODELS: dict[str, dict] = {
    f"vit_{width}_{grid}": dict(patch_size=p, embed_dim=d, depth=n, num_heads=h)
    for width, (d, n, h) in _WIDTHS.items()
    for grid, (p, _) in _GRIDS.items()
}
default_cfgs = generate_default_cfgs({
    f"vit_{width}_{grid}": _cfg(size) for width in _WIDTHS for grid, (_, size) in _GRIDS.items()
})


def _register(name: str, args: dict) -> None:
    def entrypoint(pretrained: bool = False, **kwargs) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"{name} has no published weights; pass checkpoint=PATH to vitray.models.create_model")
        return _create_vision_transformer(name, pretrained=False, **dict(args, **kwargs))

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"vitray {name}: ViT {args}"
    globals()[name] = register_model(entrypoint)


for _name, _args in VITRAY_MODELS.items():
    _register(_name, _args)

# The timm families vitray supports by name: plain ViT (not CLIP/SigLIP/hybrid variants) and DeiT.
_TIMM_FAMILY = re.compile(
    r"^(vit_(tiny|small|medium|base|large|huge)_patch(8|14|16|32)_(\d+)"
    r"|deit3?_(tiny|small|medium|base|large|huge)(_distilled)?_patch16_(\d+))$"
)


@lru_cache(maxsize=1)
def list_zoo() -> tuple[str, ...]:
    """Every name vitray builds: its own small-image configs first, then timm's ViT and DeiT families."""
    timm_names = sorted(n for n in timm.list_models(["vit_*", "deit*"]) if _TIMM_FAMILY.match(n))
    return tuple(VITRAY_MODELS) + tuple(n for n in timm_names if n not in VITRAY_MODELS)


def is_model(name: str) -> bool:
    return name in VITRAY_MODELS or bool(_TIMM_FAMILY.match(name) and timm.is_model(name))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    params: int
    gflops: float  # forward FLOPs per image (multiply-adds count 2), at img_size

    @property
    def gmacs(self) -> float:
        return self.gflops / 2


def default_img_size(name: str) -> int:
    return int(timm.get_pretrained_cfg(name).input_size[-1])


@lru_cache(maxsize=None)
def model_info(name: str, img_size: int | None = None, num_classes: int = 1000) -> ModelInfo:
    """Parameters and forward FLOPs, counted on the meta device: no memory, no weights, milliseconds."""
    from torch.utils.flop_counter import FlopCounterMode

    img_size = img_size or default_img_size(name)
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes, img_size=img_size)
        x = torch.empty(1, 3, img_size, img_size)
        with FlopCounterMode(display=False) as counter:
            model(x)
    params = sum(p.numel() for p in model.parameters())
    pe = model.patch_embed
    return ModelInfo(name, img_size, int(pe.patch_size[0]), int(model.embed_dim), len(model.blocks), params,
                     counter.get_total_flops() / 1e9)
