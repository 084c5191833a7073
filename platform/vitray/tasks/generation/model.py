"""The generator's architecture in an export: the DiT's shape (:class:`vitray.models.dit.DiTArch`), the ViT it is
shaped like, and how it is conditioned and sampled (the text encoder's name, the class names of a label-conditioned
model, the sampler's defaults), so `vitray generate` needs nothing else."""
from __future__ import annotations

from torch import nn

__all__ = ["ARCHITECTURE"]

_DIT_KEYS = ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes",
             "cond_dim")


class GeneratorArchitecture:
    def arch(self, cfg, img_size: int) -> dict:
        from vitray.models.dit import vit_shape
        from vitray.models.text_encoder import TEXT_ENCODERS

        g = cfg.generation
        caption = g.condition == "caption"
        text_dim = 384 if caption else 0
        if caption and g.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"generation.text_encoder: unknown {g.text_encoder!r} (known: {', '.join(TEXT_ENCODERS)})")
        return {"name": cfg.model.name, "img_size": img_size, "in_chans": cfg.model.in_chans, **vit_shape(cfg.model.name),
                "num_classes": 0 if caption else cfg.model.num_classes, "cond_dim": text_dim,
                "condition": g.condition, "text_encoder": g.text_encoder if caption else None,
                "sample_steps": g.sample_steps, "guidance": g.guidance}

    def build(self, arch: dict, checkpoint: str | None = None, **train_kwargs) -> nn.Module:
        from vitray.models import read_state_dict
        from vitray.models.dit import DiT, DiTArch

        model = DiT(DiTArch(**{k: arch[k] for k in _DIT_KEYS}))
        if checkpoint:  # a generator's own weights (an export or a file): every key, every shape
            model.load_state_dict(read_state_dict(checkpoint), strict=True)
        if train_kwargs.get("grad_checkpointing"):
            model.set_grad_checkpointing(True)
        return model

    def export_state(self, state: dict) -> dict:
        return state

    def for_training(self, cfg, checkpoint: str | None = None) -> nn.Module:
        from vitray.models.zoo import default_img_size

        arch = self.arch(cfg, cfg.model.img_size or default_img_size(cfg.model.name))
        return self.build(arch, checkpoint=checkpoint or cfg.model.checkpoint,
                          grad_checkpointing=cfg.model.grad_checkpointing)


ARCHITECTURE = GeneratorArchitecture()
