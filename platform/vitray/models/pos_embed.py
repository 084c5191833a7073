"""Fixed 2-D sine-cosine position embeddings (MAE, arXiv 2111.06377, after "Attention is all you need")."""
from __future__ import annotations

import torch

__all__ = ["sincos_2d", "set_sincos_pos_embed"]


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
    """(num_prefix_tokens + H*W, embed_dim) float32; prefix (class/dist) tokens get zeros, as in MAE.
    Half of the channels encode the column, the other half the row (MAE's layout)."""
    if embed_dim % 4:
        raise ValueError(f"sincos position embeddings need embed_dim divisible by 4, got {embed_dim}")
    gh, gw = grid_size
    rows = torch.arange(gh, dtype=torch.float64)
    cols = torch.arange(gw, dtype=torch.float64)
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")  # (H, W), row-major token order
    emb = torch.cat([_sincos_1d(embed_dim // 2, grid_c), _sincos_1d(embed_dim // 2, grid_r)], dim=1)
    if num_prefix_tokens:
        emb = torch.cat([torch.zeros(num_prefix_tokens, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


@torch.no_grad()
def set_sincos_pos_embed(model) -> None:
    """Replace a timm ViT's learned ``pos_embed`` with the fixed 2-D sincos table (frozen: requires_grad False).
    The parameter keeps its name and shape, so state dicts stay timm-compatible."""
    grid = tuple(model.patch_embed.grid_size)
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    table = sincos_2d(model.pos_embed.shape[-1], grid, prefix)
    if table.shape[0] != model.pos_embed.shape[1]:
        raise ValueError(f"pos_embed has {model.pos_embed.shape[1]} tokens, sincos table {table.shape[0]}")
    model.pos_embed.copy_(table.unsqueeze(0).to(model.pos_embed.dtype))
    model.pos_embed.requires_grad_(False)
