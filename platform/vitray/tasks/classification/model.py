"""The classifier's architecture in an export: the ``create_model`` arguments of a timm ViT/DeiT with its head."""
from __future__ import annotations

from torch import nn

from vitray.models import create_model

__all__ = ["ARCHITECTURE"]

_ARCH_KEYS = ("name", "num_classes", "img_size", "in_chans", "pos_embed", "global_pool")


class ClassifierArchitecture:
    def arch(self, cfg, img_size: int) -> dict:
        """What the export stores (JSON): enough to build the model again, nothing about training."""
        return {**{k: getattr(cfg.model, k) for k in _ARCH_KEYS}, "img_size": img_size}

    def build(self, arch: dict, checkpoint: str | None = None, **train_kwargs) -> nn.Module:
        arch = dict(arch)
        name = arch.pop("name")
        return create_model(name, checkpoint=checkpoint, **{k: v for k, v in arch.items() if v is not None},
                            **train_kwargs)

    def for_training(self, cfg, checkpoint: str | None = None) -> nn.Module:
        m = cfg.model
        return self.build({k: getattr(m, k) for k in _ARCH_KEYS}, checkpoint=checkpoint or m.checkpoint,
                          drop_rate=m.drop_rate, drop_path=m.drop_path, grad_checkpointing=m.grad_checkpointing)


ARCHITECTURE = ClassifierArchitecture()
