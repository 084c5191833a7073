"""The classifier's architecture in an export: the ``create_model`` arguments of a timm ViT/DeiT with its head.

A linear probe (``train.linear_probe``) has MAE's probing head: a BatchNorm without affine parameters before the
linear classifier (``head.0``, ``head.1``), so the export records ``probe_norm`` and builds the same head back."""
from __future__ import annotations

from torch import nn

from vitray.models import create_model, load_weights, read_state_dict

__all__ = ["ARCHITECTURE", "add_probe_norm"]

_ARCH_KEYS = ("name", "num_classes", "img_size", "in_chans", "pos_embed", "global_pool")


def add_probe_norm(model: nn.Module) -> nn.Module:
    """MAE's linear-probe head: ``BatchNorm1d(affine=False, eps=1e-6)`` then the model's linear classifier."""
    if not isinstance(model.head, nn.Linear):
        raise ValueError(f"a linear probe needs a linear classifier; {type(model).__name__} has {type(model.head)}")
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    return model


class ClassifierArchitecture:
    def arch(self, cfg, img_size: int) -> dict:
        """What the export stores (JSON): enough to build the model again, nothing about training."""
        out = {**{k: getattr(cfg.model, k) for k in _ARCH_KEYS}, "img_size": img_size}
        if cfg.train.linear_probe:
            out["probe_norm"] = True
        return out

    def build(self, arch: dict, checkpoint: str | None = None, **train_kwargs) -> nn.Module:
        arch = dict(arch)
        name, probe = arch.pop("name"), arch.pop("probe_norm", False)
        model = create_model(name, checkpoint=None if probe else checkpoint,
                             **{k: v for k, v in arch.items() if v is not None}, **train_kwargs)
        if probe:
            add_probe_norm(model)
            if checkpoint:  # after the head has its probe shape (an encoder has no head: it starts fresh)
                load_weights(model, read_state_dict(checkpoint), source=str(checkpoint))
                if arch.get("pos_embed") == "sincos":
                    from vitray.models import set_sincos_pos_embed

                    set_sincos_pos_embed(model)
        return model

    def for_training(self, cfg, checkpoint: str | None = None) -> nn.Module:
        m = cfg.model
        arch = {k: getattr(m, k) for k in _ARCH_KEYS}
        if cfg.train.linear_probe:
            arch["probe_norm"] = True
        return self.build(arch, checkpoint=checkpoint or m.checkpoint, drop_rate=m.drop_rate,
                          drop_path=m.drop_path, grad_checkpointing=m.grad_checkpointing)


ARCHITECTURE = ClassifierArchitecture()
