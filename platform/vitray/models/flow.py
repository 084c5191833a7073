"""Rectified flow (Liu et al., arXiv 2209.03003; the objective of SD3, arXiv 2403.03206): the training loss and the
Euler sampler with classifier-free guidance (Ho and Salimans, arXiv 2207.12598).

A noisy image on the straight line from data ``x0`` (t = 0) to Gaussian noise ``e`` (t = 1) is
``x_t = (1 - t) x0 + t e``; the model predicts the velocity ``v = e - x0`` (constant along the line), and sampling
integrates ``dx/dt = v`` from t = 1 to t = 0 in ``steps`` Euler steps. Training times are drawn logit-normal
(SD3's choice: more weight on the middle of the path, where the velocity is least obvious).

Guidance: ``v = v_uncond + g (v_cond - v_uncond)``: g = 1 is the plain conditional model, g = 0 the unconditional
one (the output then ignores the prompt), g > 1 trades variety for fidelity to the prompt.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["flow_loss", "sample", "noisy"]


def noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * noise


def flow_loss(model: nn.Module, x0: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None,
              generator: torch.Generator | None = None, reduce: bool = True) -> torch.Tensor:
    """Mean squared velocity error; per image (N,) when ``reduce`` is False. ``generator`` fixes the noise and the
    times (evaluation uses a fixed one, so ``val/loss`` compares across epochs)."""
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
    t = torch.sigmoid(torch.randn(n, generator=generator, device=x0.device, dtype=torch.float32))
    v = model(noisy(x0, noise, t), t, cond, drop)
    err = (v.float() - (noise - x0).float()).pow(2).flatten(1).mean(1)
    return err.mean() if reduce else err


@torch.no_grad()
def sample(model: nn.Module, cond: torch.Tensor, shape: tuple[int, ...], steps: int = 12, guidance: float = 2.0,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images (N, *shape) in the model's data range (float32), one per condition. The start noise comes from
    ``noise`` or ``generator`` (same generator state, same images); ``dtype`` runs the model in it (bf16)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = cond.shape[0]
    device = cond.device
    if noise is None:
        noise = torch.randn((n, *shape), generator=generator, device=device, dtype=torch.float32)
    x = noise.float()
    guided = guidance != 1.0
    both = torch.cat([cond, cond]) if guided else cond
    drop = torch.cat([torch.zeros(n, dtype=torch.bool, device=device), torch.ones(n, dtype=torch.bool, device=device)]) \
        if guided else torch.zeros(n, dtype=torch.bool, device=device)
    ts = torch.linspace(1.0, 0.0, steps + 1, device=device)
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        xin = torch.cat([x, x]) if guided else x
        tin = t.expand(xin.shape[0])
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and dtype != torch.float32):
            v = model(xin, tin, both, drop).float()
        if guided:
            v_cond, v_uncond = v[:n], v[n:]
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + dt * v
    return x
