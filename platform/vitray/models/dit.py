"""DiT: a diffusion transformer (Peebles and Xie, "Scalable Diffusion Models with Transformers", arXiv 2212.09748).

Built from the same timm blocks as the backbone (timm's ``Attention`` and ``Mlp``, timm's ``PatchEmbed``) and sized
like a ViT of the zoo: ``DiT.from_vit("vit_pico_patch4_32", ...)`` takes that ViT's width, depth, heads, MLP ratio
and patch size. What the paper adds, and this module holds:

* the condition ``c`` = timestep embedding + condition embedding, one vector per image;
* adaLN-Zero blocks: ``c`` regresses a shift, scale and gate for the attention and the MLP branch of every block
  (the LayerNorms have no affine weights), and the gates start at zero so every block starts as the identity;
* a final adaLN layer and a linear projection back to patches, then unpatchify;
* fixed 2-D sine-cosine position embeddings.

The condition is a class id (an embedding table with one extra row, the "no condition" of classifier-free guidance)
or a vector from a frozen text encoder (projected by an MLP; "no condition" is a learned vector in the text space).
``forward(x, t, cond, drop)`` takes ``t`` in [0, 1] (embedded as ``t * 1000``, the timestep range the reference code
and diffusers use) and ``drop``, a bool per image that replaces its condition by "no condition".

Layout and initialisation follow the paper's reference code; the layer conventions (timestep frequencies,
``[cos, sin]`` order) are diffusers' ``DiTTransformer2DModel``, which ``tests/test_dit.py`` checks this module
against on the same weights.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn

from .pos_embed import sincos_2d

__all__ = ["DiT", "DiTArch", "vit_shape", "timestep_features"]

TIME_SCALE = 1000.0  # t in [0, 1] is embedded as t * TIME_SCALE
FREQ_DIM = 256  # sinusoidal features of the timestep


@dataclass(frozen=True)
class DiTArch:
    """Everything that builds a DiT (what an export records)."""

    img_size: int
    in_chans: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 0  # > 0: conditioned on a class id
    cond_dim: int = 0  # > 0: conditioned on a text vector of this size

    def __post_init__(self):
        if (self.num_classes > 0) == (self.cond_dim > 0):
            raise ValueError("a DiT is conditioned on exactly one of: a class id (num_classes) or a vector (cond_dim)")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size {self.patch_size}")
        if self.embed_dim % 4:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sine-cosine positions)")

    def to_dict(self) -> dict:
        return asdict(self)


def vit_shape(name: str) -> dict:
    """The width, depth, heads, MLP ratio and patch size of a zoo ViT (read from timm on the meta device)."""
    import timm

    from .zoo import is_model

    if not is_model(name):
        from .factory import UnknownModelError

        raise UnknownModelError(f"unknown model {name!r}; `vitray models zoo` lists the buildable names")
    with torch.device("meta"):
        vit = timm.create_model(name, num_classes=0)
    block = vit.blocks[0]
    return {"patch_size": int(vit.patch_embed.patch_size[0]), "embed_dim": int(vit.embed_dim),
            "depth": len(vit.blocks), "num_heads": int(block.attn.num_heads),
            "mlp_ratio": block.mlp.fc1.out_features / vit.embed_dim}


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10_000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) ``[cos, sin]`` features at geometric frequencies (diffusers' ``Timesteps`` with
    ``flip_sin_to_cos=True, downscale_freq_shift=1``, what its DiT uses)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    args = t.float()[:, None] * torch.exp(exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm attention and MLP, each branch shifted, scaled and gated by the condition (adaLN-Zero)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a[:, None] * self.attn(_modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(_modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class ConditionEmbedder(nn.Module):
    """A class id or a text vector -> (N, dim); ``drop`` rows get the "no condition" embedding."""

    def __init__(self, dim: int, num_classes: int = 0, cond_dim: int = 0):
        super().__init__()
        self.num_classes, self.cond_dim = num_classes, cond_dim
        if num_classes:
            self.embedding_table = nn.Embedding(num_classes + 1, dim)  # the last row: no condition
        else:
            self.null = nn.Parameter(torch.zeros(cond_dim))
            self.proj = nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            ids = cond.long()
            if drop is not None:
                ids = torch.where(drop, torch.full_like(ids, self.num_classes), ids)
            return self.embedding_table(ids)
        vec = cond.to(self.null.dtype)
        if drop is not None:
            vec = torch.where(drop[:, None], self.null.expand_as(vec), vec)
        return self.proj(vec)


class DiT(nn.Module):
    """Predicts, for noisy images ``x`` (N, C, H, W) at times ``t`` under conditions ``cond``, a tensor of the same
    shape (here the rectified-flow velocity, :mod:`vitray.models.flow`)."""

    def __init__(self, arch: DiTArch):
        super().__init__()
        self.arch = arch
        dim, p = arch.embed_dim, arch.patch_size
        self.patch_embed = PatchEmbed(arch.img_size, p, arch.in_chans, dim, bias=True)
        grid = self.patch_embed.grid_size
        self.register_buffer("pos_embed", sincos_2d(dim, tuple(grid)).unsqueeze(0), persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.c_embedder = ConditionEmbedder(dim, arch.num_classes, arch.cond_dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, arch.num_heads, arch.mlp_ratio) for _ in range(arch.depth))
        self.final_layer = FinalLayer(dim, p, arch.in_chans)
        self.grad_checkpointing = False
        self.initialize_weights()

    @classmethod
    def from_vit(cls, name: str, img_size: int, in_chans: int, num_classes: int = 0, cond_dim: int = 0) -> "DiT":
        """A DiT shaped like the zoo ViT ``name`` (width, depth, heads, MLP ratio, patch size)."""
        return cls(DiTArch(img_size=img_size, in_chans=in_chans, num_classes=num_classes, cond_dim=cond_dim,
                           **vit_shape(name)))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The reference code's: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.arch.num_classes:
            nn.init.normal_(self.c_embedder.embedding_table.weight, std=0.02)
        else:
            nn.init.normal_(self.c_embedder.null, std=0.02)
        for lin in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def condition(self, t: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """(N, dim): the timestep embedding plus the condition's."""
        t_emb = self.t_embedder(timestep_features(t * TIME_SCALE).to(self.t_embedder[0].weight.dtype))
        return t_emb + self.c_embedder(cond, drop).to(t_emb.dtype)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        p, c = self.arch.patch_size, self.arch.in_chans
        h, w = self.patch_embed.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.patch_embed(x) + self.pos_embed.to(x.dtype)
        c = self.condition(t, cond, drop).to(tokens.dtype)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))
