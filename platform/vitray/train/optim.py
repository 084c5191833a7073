"""Optimizer and lr schedule: torch AdamW over timm's parameter groups, warmup then cosine, per optimizer step.

A torch optimizer (not DeepSpeed's FusedAdam/CPUAdam) needs no compiled ops, on CPU or GPU; DeepSpeed wraps it
for ZeRO partitioning. The schedule is a ``LambdaLR`` handed to ``deepspeed.initialize``: DeepSpeed steps it once
per optimizer step (not per micro step) and saves it in its checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "lr_factor"]


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """No weight decay on norms, biases, position embeddings and cls/dist/register tokens (1-D params and the
    model's ``no_weight_decay()``); with ``layer_decay``, block i's lr is scaled by layer_decay^(depth - i), using
    timm's layer grouping (the embeddings are layer 0, the head the last)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if layer_decay is not None and layer_decay < 1.0:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]  # fixed sincos pos_embed is not optimised
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    layer_decay: float | None = None) -> torch.optim.Optimizer:
    """On CUDA parameters, torch's fused AdamW kernel (one launch for all tensors); foreach on CPU."""
    groups = param_groups(model, weight_decay, layer_decay)
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=0.0, fused=on_cuda or None)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup from ~0, then cosine to min_ratio."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, lr: float, min_lr: float,
                    schedule: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    min_ratio = min(1.0, min_lr / lr) if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, min_ratio, schedule))
