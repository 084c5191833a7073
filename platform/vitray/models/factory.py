"""``create_model``: every vitray model is built here, from a name and options, or from a ``model`` config."""
from __future__ import annotations

from typing import Literal

import timm
import torch
from torch import nn

from .checkpoint import load_weights, read_state_dict
from .pos_embed import set_sincos_pos_embed
from .zoo import is_model

__all__ = ["UnknownModelError", "create_model", "create_model_from_config", "feature_maps"]


class UnknownModelError(ValueError):
    pass


def create_model(
    name: str,
    num_classes: int | None = None,
    img_size: int | None = None,
    checkpoint: str | None = None,
    *,
    pos_embed: Literal["learned", "sincos"] = "learned",
    global_pool: Literal["token", "avg"] = "token",
    drop_rate: float = 0.0,
    drop_path: float = 0.0,
    grad_checkpointing: bool = False,
    in_chans: int = 3,
    **timm_kwargs,
) -> nn.Module:
    """Build a timm ViT/DeiT or a vitray small-image ViT by name.

    ``num_classes`` None keeps the architecture's default, 0 builds a backbone without classifier.
    ``checkpoint`` is a local weights file or export directory (MLflow URIs are resolved by
    ``vitray.tracking`` before they reach here). ``pos_embed='sincos'`` fixes the position embeddings to the
    2-D sine-cosine table (not trained, not loaded from checkpoints).
    """
    if not is_model(name):
        raise UnknownModelError(f"unknown model {name!r}; `vitray models zoo` lists the buildable names")
    if pos_embed not in ("learned", "sincos"):
        raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")
    kwargs = dict(global_pool=global_pool, drop_rate=drop_rate, drop_path_rate=drop_path, in_chans=in_chans, **timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint:
        load_weights(model, read_state_dict(checkpoint), source=str(checkpoint))
    if pos_embed == "sincos":
        set_sincos_pos_embed(model)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.vitray_pos_embed = pos_embed
    return model


def create_model_from_config(cfg, checkpoint: str | None = None) -> nn.Module:
    """Build from a ``vitray.config.ModelConfig``; ``checkpoint`` (a resolved local path) overrides cfg.checkpoint."""
    return create_model(
        cfg.name, num_classes=cfg.num_classes, img_size=cfg.img_size, checkpoint=checkpoint or cfg.checkpoint,
        pos_embed=cfg.pos_embed, global_pool=cfg.global_pool, drop_rate=cfg.drop_rate, drop_path=cfg.drop_path,
        grad_checkpointing=cfg.grad_checkpointing, in_chans=cfg.in_chans,
    )


def feature_maps(model: nn.Module, x: torch.Tensor, indices: int | list[int] = 4, norm: bool = False) -> list[torch.Tensor]:
    """Multi-level (B, C, H/p, W/p) feature maps from the backbone's blocks (timm's ``forward_intermediates``):
    an int takes the last N blocks, a list picks blocks by index. Input for ViTDet-style pyramids and dense heads."""
    return model.forward_intermediates(x, indices=indices, norm=norm, output_fmt="NCHW", intermediates_only=True)
