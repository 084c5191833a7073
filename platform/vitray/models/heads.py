"""Task heads that sit on a backbone's token sequence."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

__all__ = ["ClassificationHead"]


class ClassificationHead(nn.Module):
    """Pool a (B, N, C) token sequence and classify it.

    ``pool='token'`` takes the class token; ``pool='avg'`` averages the patch tokens (skipping the
    ``num_prefix_tokens`` class/register tokens) and normalises the result (``fc_norm``), as timm and MAE do.
    Parameter names match timm's (``fc_norm``, ``head``), so a timm classifier's head weights load into it.
    """

    def __init__(self, embed_dim: int, num_classes: int, pool: str = "token", num_prefix_tokens: int = 1,
                 drop_rate: float = 0.0, norm_layer=partial(nn.LayerNorm, eps=1e-6)):
        super().__init__()
        if pool not in ("token", "avg"):
            raise ValueError(f"pool must be 'token' or 'avg', got {pool!r}")
        if pool == "token" and num_prefix_tokens < 1:
            raise ValueError("pool='token' needs a class token (num_prefix_tokens >= 1)")
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.fc_norm = norm_layer(embed_dim) if pool == "avg" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool == "token":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.fc_norm(self.pool_tokens(tokens))))
