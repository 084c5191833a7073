"""The segmenter's architecture in an export: the backbone's ``create_model`` arguments plus the decoder's."""
from __future__ import annotations

import logging

from torch import nn

from vitray.models import create_model, load_weights, read_state_dict
from vitray.models.segmentation import SegmentationViT

__all__ = ["ARCHITECTURE"]

log = logging.getLogger("vitray.models")
_BACKBONE_KEYS = ("name", "img_size", "in_chans", "pos_embed")


class SegmenterArchitecture:
    def arch(self, cfg, img_size: int) -> dict:
        opts = cfg.segmentation
        return {**{k: getattr(cfg.model, k) for k in _BACKBONE_KEYS}, "img_size": img_size,
                "num_classes": cfg.model.num_classes, "decoder": opts.decoder, "channels": opts.channels}

    def build(self, arch: dict, checkpoint: str | None = None, **train_kwargs) -> nn.Module:
        """``checkpoint``: a segmentation export (its decoder too, when it fits) or any classifier's weights (an
        export, a timm/.pth/.safetensors file): the backbone is initialised, its classifier dropped."""
        backbone = create_model(arch["name"], num_classes=0, img_size=arch.get("img_size"),
                                in_chans=arch.get("in_chans", 3), pos_embed=arch.get("pos_embed", "learned"),
                                **train_kwargs)
        model = SegmentationViT(backbone, arch["num_classes"], arch.get("decoder", "pup"), arch.get("channels", 64))
        if checkpoint:
            state = read_state_dict(checkpoint)
            if any(k.startswith("backbone.") for k in state):  # a segmenter: backbone, and the decoder if it fits
                own = model.decoder.state_dict()
                decoder = {k[len("decoder."):]: v for k, v in state.items() if k.startswith("decoder.")}
                backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
                load_weights(model.backbone, backbone_state, source=str(checkpoint))
                if decoder.keys() == own.keys() and all(own[k].shape == v.shape for k, v in decoder.items()):
                    model.decoder.load_state_dict(decoder)
                else:
                    log.warning("vitray: %s has another decoder: the decoder is re-initialised", checkpoint)
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


ARCHITECTURE = SegmenterArchitecture()
