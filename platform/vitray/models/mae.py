"""Masked autoencoder pretraining of a timm ViT (He et al., "Masked Autoencoders Are Scalable Vision Learners",
arXiv 2111.06377; the layout of its reference code, facebookresearch/mae ``models_mae.py``).

* masking: per sample, a random permutation of the patches (argsort of uniform noise); the first
  ``L - round(ratio * L)`` are kept, the rest masked: every sample has exactly ``round(ratio * L)`` masked patches;
* encoder: the very ``VisionTransformer`` classification trains (``self.backbone``, timm's keys, no classifier), run
  on the visible patches plus its prefix (class/register) tokens, each patch with its own position embedding;
* decoder: a linear projection to the decoder width, a learned mask token in every masked slot (unshuffled), fixed
  2-D sin-cos positions, ``depth`` timm blocks, LayerNorm, a linear prediction of each patch's pixels;
* loss: mean squared error over masked patches only, each target patch normalised by its own mean and variance
  (``norm_pix_loss``) unless turned off.

Only the encoder leaves training (:func:`vitray.tasks.mae.model`): it is a backbone for classifiers, segmenters and
detectors, and ``vitray embed``'s feature extractor.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbone_hooks import BackboneHooks
from .pos_embed import sincos_2d

__all__ = ["MaskedAutoencoder", "random_masking", "patchify", "unpatchify", "masked_patch_loss", "num_masked"]


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches masked per sample: round(ratio x L), at least one kept and (for ratio > 0) at least one masked."""
    n = round(ratio * num_patches)
    if ratio > 0:
        n = max(1, n)
    return min(n, num_patches - 1)


def random_masking(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None):
    """(N, L, D) patch tokens -> (visible tokens (N, L - m, D), mask (N, L) 1 = masked, ids_restore (N, L)) with
    ``m = num_masked(L, ratio)``; the visible tokens keep the order of a random permutation per sample."""
    n, length, dim = x.shape
    keep = length - num_masked(length, ratio)
    noise = torch.rand(n, length, device=x.device, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return visible, torch.gather(mask, 1, ids_restore), ids_restore


def patchify(imgs: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), patches in the row-major order of timm's ``PatchEmbed`` tokens."""
    n, c, h, w = imgs.shape
    gh, gw = h // patch, w // patch
    x = imgs.reshape(n, c, gh, patch, gw, patch)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, gh * gw, patch * patch * c)


def unpatchify(x: torch.Tensor, patch: int, grid: tuple[int, int], chans: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: (N, L, p*p*C) -> (N, C, H, W)."""
    n = x.shape[0]
    gh, gw = grid
    x = x.reshape(n, gh, gw, patch, patch, chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, chans, gh * patch, gw * patch)


def normalised_targets(imgs: torch.Tensor, patch: int, norm_pix: bool) -> tuple[torch.Tensor, tuple | None]:
    """The per-patch regression targets, and (mean, std) per patch when normalised (to undo it for pictures)."""
    target = patchify(imgs.float(), patch)
    if not norm_pix:
        return target, None
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    return (target - mean) / std, (mean, std)


def masked_patch_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample: the mean over its masked patches of the per-patch mean squared error ((N,) float32)."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class MaskedAutoencoder(BackboneHooks, nn.Module):
    """``forward(imgs)`` -> (per-sample loss (N,), predicted patches (N, L, p*p*C), mask (N, L)); the training loss is
    the mean of the first. ``imgs`` are normalised images at the backbone's input size."""

    def __init__(self, backbone: nn.Module, *, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 mask_ratio: float = 0.75, norm_pix_loss: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        from timm.layers import LayerNorm
        from timm.models.vision_transformer import Block

        if getattr(backbone, "dist_token", None) is not None:
            raise ValueError("MAE pretrains plain ViT encoders; a DeiT-distilled model has a distillation token "
                             "(pick the same size without _distilled)")
        if getattr(backbone, "dynamic_img_size", False):
            raise ValueError("MAE needs a fixed input size (dynamic_img_size is on)")
        self.backbone = backbone
        pe = backbone.patch_embed
        self.patch = int(pe.patch_size[0])
        self.grid = tuple(int(g) for g in pe.grid_size)
        self.chans = int(pe.proj.in_channels)
        self.prefix = int(backbone.num_prefix_tokens)
        self.mask_ratio, self.norm_pix_loss = float(mask_ratio), bool(norm_pix_loss)
        dim = backbone.embed_dim
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        # fixed (not learned, not saved): rebuilt from the grid, as MAE's frozen decoder_pos_embed
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_dim, self.grid, self.prefix)[None],
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
            for _ in range(decoder_depth))
        self.decoder_norm = LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * self.chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        """MAE's initialisation of what it adds (the encoder keeps timm's): xavier-uniform linears, zero biases,
        unit LayerNorms, N(0, 0.02) mask token."""
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("backbone"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------ encoder
    def _final_norm(self) -> nn.Module:
        b = self.backbone
        return b.norm if not isinstance(b.norm, nn.Identity) else b.fc_norm  # avg-pooled ViTs norm after pooling

    def encode(self, imgs: torch.Tensor, ratio: float, generator: torch.Generator | None = None):
        """Visible patches (and prefix tokens) through the encoder: (latent (N, P + L - m, D), mask, ids_restore)."""
        b = self.backbone
        x = b.patch_embed(imgs)
        pos = b.pos_embed
        if b.no_embed_class:
            x, prefix_pos = x + pos, None
        else:
            x, prefix_pos = x + pos[:, self.prefix:], pos[:, :self.prefix]
        x, mask, ids_restore = random_masking(x, ratio, generator)
        tokens = [t.expand(x.shape[0], -1, -1) for t in (b.cls_token, getattr(b, "reg_token", None)) if t is not None]
        if tokens:
            prefix = torch.cat(tokens, dim=1)
            if prefix_pos is not None:
                prefix = prefix + prefix_pos
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        x = b.norm_pre(b.pos_drop(x))
        if getattr(b, "grad_checkpointing", False) and self.training and not torch.jit.is_scripting():
            from timm.models import checkpoint_seq

            x = checkpoint_seq(b.blocks, x)
        else:
            x = b.blocks(x)
        return self._final_norm()(x), mask, ids_restore

    # ------------------------------------------------------------------------------------------ decoder
    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoded tokens + mask tokens in the masked slots -> predicted pixels of every patch (N, L, p*p*C)."""
        x = self.decoder_embed(latent)
        p = self.prefix
        n, length = ids_restore.shape
        patches = torch.cat([x[:, p:], self.mask_token.to(x.dtype).expand(n, length - (x.shape[1] - p), -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore[:, :, None].expand(-1, -1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :p], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, p:]

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None):
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.encode(imgs, ratio, generator)
        pred = self.decode(latent, ids_restore)
        target, _ = normalised_targets(imgs, self.patch, self.norm_pix_loss)
        return masked_patch_loss(pred, target, mask.float()), pred, mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predicted patches back in image space (normalised pixels), undoing the per-patch normalisation with each
        target patch's own statistics (as MAE's visualisation does)."""
        _, stats = normalised_targets(imgs, self.patch, self.norm_pix_loss)
        pred = pred.float()
        if stats is not None:
            mean, std = stats
            pred = pred * std + mean
        return unpatchify(pred, self.patch, self.grid, self.chans)

    def no_weight_decay(self):
        return super().no_weight_decay() | {"mask_token"}
