"""The MAE run's architecture: trained as encoder + decoder (:class:`vitray.models.mae.MaskedAutoencoder`), exported
as the encoder alone: a timm ViT without classifier under timm's own keys, so a classifier, segmenter or detector
loads it with ``model.checkpoint`` (no renaming), and the export answers with embeddings."""
from __future__ import annotations

from torch import nn

from vitray.models import create_model

__all__ = ["ARCHITECTURE"]

ENCODER_KEYS = ("name", "img_size", "in_chans", "pos_embed", "global_pool")
OPTION_KEYS = ("mask_ratio", "decoder_dim", "decoder_depth", "decoder_heads", "norm_pix_loss")


class MaeArchitecture:
    def arch(self, cfg, img_size: int) -> dict:
        """The encoder's ``create_model`` arguments (no classifier), and the pretraining options (a record)."""
        return {**{k: getattr(cfg.model, k) for k in ENCODER_KEYS}, "img_size": img_size, "num_classes": 0,
                **{k: getattr(cfg.mae, k) for k in OPTION_KEYS}}

    def build(self, arch: dict, checkpoint: str | None = None, **train_kwargs) -> nn.Module:
        """The encoder of an export (what serving, scoring and ``vitray embed`` run)."""
        return create_model(arch["name"], num_classes=0, img_size=arch.get("img_size"),
                            in_chans=arch.get("in_chans", 3), pos_embed=arch.get("pos_embed", "learned"),
                            global_pool=arch.get("global_pool", "token"), checkpoint=checkpoint, **train_kwargs)

    def export_state(self, state: dict) -> dict:
        """The trained model's state -> the encoder's (the decoder is dropped)."""
        return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}

    def for_training(self, cfg, checkpoint: str | None = None) -> nn.Module:
        """Encoder + decoder. ``checkpoint`` (any classifier or encoder weights) initialises the encoder."""
        from vitray.models.mae import MaskedAutoencoder
        from vitray.models.zoo import default_img_size

        m, o = cfg.model, cfg.mae
        arch = self.arch(cfg, m.img_size or default_img_size(m.name))
        encoder = self.build(arch, checkpoint=checkpoint or m.checkpoint, drop_rate=m.drop_rate,
                             drop_path=m.drop_path, grad_checkpointing=m.grad_checkpointing)
        return MaskedAutoencoder(encoder, decoder_dim=o.decoder_dim, decoder_depth=o.decoder_depth,
                                 decoder_heads=o.decoder_heads, mask_ratio=o.mask_ratio,
                                 norm_pix_loss=o.norm_pix_loss)


ARCHITECTURE = MaeArchitecture()
