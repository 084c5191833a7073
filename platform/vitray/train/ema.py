"""Exponential moving average of the weights (Polyak averaging), kept in fp32 whatever the training precision."""
from __future__ import annotations

import torch

__all__ = ["WeightEma"]


class WeightEma:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step, for every floating-point tensor
    of the module's state dict. Works on the full parameters of ZeRO 0-2 (ZeRO-3 partitions them: not supported).

    With ``warmup``, the n-th update uses ``min(decay, (1 + n) / (10 + n))`` (TensorFlow's ``num_updates`` rule):
    early averages forget the initial weights quickly, so a short run's average is not held back by them."""

    UPDATES = "_ema_updates"  # the update count in state_dict(), for resuming the warmup

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        decay = self.current_decay()
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def swap_into(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Load the averaged weights into ``module``; returns its own weights, for :meth:`restore`."""
        own = {k: v.detach().clone() for k, v in module.state_dict().items() if k in self.shadow}
        module.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()}, strict=False)
        return own

    @torch.no_grad()
    def restore(self, module: torch.nn.Module, own: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(own, strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights and the update count (a checkpoint's ``ema.pt``); :attr:`shadow` is the weights."""
        return {**self.shadow, self.UPDATES: torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        self.updates = int(state.pop(self.UPDATES, torch.tensor(0)))
        self.shadow = {k: v.float().clone() for k, v in state.items()}
