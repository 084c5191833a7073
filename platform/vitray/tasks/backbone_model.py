"""What the architectures of tasks built on a ViT backbone share (segmentation, detection): the export stores the
backbone's ``create_model`` arguments plus the task's own options, and a checkpoint initialises the model from

* an export of the same task: the backbone, and each of the task's modules whose weights fit (else re-initialised,
  with a warning), or
* any classifier's weights (an export, a timm/.pth/.safetensors file): the backbone only, its classifier dropped.
"""
from __future__ import annotations

import logging

from torch import nn

from vitray.models import create_model, load_weights, read_state_dict

__all__ = ["BackboneArchitecture"]

log = logging.getLogger("vitray.models")
BACKBONE_KEYS = ("name", "img_size", "in_chans", "pos_embed")


class BackboneArchitecture:
    #: the config section of the task's options, and the options the export keeps
    section: str = ""
    option_keys: tuple[str, ...] = ()
    #: the task's own modules (attributes of the built model), loaded from a same-task checkpoint when they fit
    modules: tuple[str, ...] = ()

    def make(self, backbone: nn.Module, arch: dict) -> nn.Module:
        raise NotImplementedError

    def arch(self, cfg, img_size: int) -> dict:
        opts = getattr(cfg, self.section)
        return {**{k: getattr(cfg.model, k) for k in BACKBONE_KEYS}, "img_size": img_size,
                "num_classes": cfg.model.num_classes, **{k: getattr(opts, k) for k in self.option_keys}}

    def build(self, arch: dict, checkpoint: str | None = None, **train_kwargs) -> nn.Module:
        backbone = create_model(arch["name"], num_classes=0, img_size=arch.get("img_size"),
                                in_chans=arch.get("in_chans", 3), pos_embed=arch.get("pos_embed", "learned"),
                                **train_kwargs)
        model = self.make(backbone, arch)
        if checkpoint:
            state = read_state_dict(checkpoint)
            if any(k.startswith("backbone.") for k in state):  # a model of this kind: backbone, and what fits
                load_weights(model.backbone, {k[len("backbone."):]: v for k, v in state.items()
                                              if k.startswith("backbone.")}, source=str(checkpoint))
                for name in self.modules:
                    own = getattr(model, name).state_dict()
                    theirs = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
                    if theirs.keys() == own.keys() and all(own[k].shape == v.shape for k, v in theirs.items()):
                        getattr(model, name).load_state_dict(theirs)
                    else:
                        log.warning("vitray: %s has another %s: it is re-initialised", checkpoint, name)
            else:  # a classifier or a plain backbone: its head is dropped
                load_weights(model.backbone, state, source=str(checkpoint))
            if arch.get("pos_embed") == "sincos":
                from vitray.models import set_sincos_pos_embed

                set_sincos_pos_embed(model.backbone)
        return model

    def for_training(self, cfg, checkpoint: str | None = None) -> nn.Module:
        from vitray.models.zoo import default_img_size

        m = cfg.model
        arch = self.arch(cfg, m.img_size or default_img_size(m.name))
        return self.build(arch, checkpoint=checkpoint or m.checkpoint, drop_rate=m.drop_rate, drop_path=m.drop_path,
                          grad_checkpointing=m.grad_checkpointing)
