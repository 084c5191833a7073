"""The segmenter's architecture in an export: the backbone's ``create_model`` arguments plus the decoder's."""
from __future__ import annotations

from vitray.models.segmentation import SegmentationViT
from vitray.tasks.backbone_model import BackboneArchitecture

__all__ = ["ARCHITECTURE"]


class SegmenterArchitecture(BackboneArchitecture):
    section = "segmentation"
    option_keys = ("decoder", "channels")
    modules = ("decoder",)

    def make(self, backbone, arch):
        return SegmentationViT(backbone, arch["num_classes"], arch.get("decoder", "pup"), arch.get("channels", 64))


ARCHITECTURE = SegmenterArchitecture()
