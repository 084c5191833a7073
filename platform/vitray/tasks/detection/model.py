"""The detector's architecture in an export: the backbone's ``create_model`` arguments, the pyramid's and head's
widths, and how its outputs are decoded (kept with the weights, so serving decodes as evaluation did)."""
from __future__ import annotations

from vitray.models.detection import DetectionViT
from vitray.tasks.backbone_model import BackboneArchitecture

__all__ = ["ARCHITECTURE"]


class DetectorArchitecture(BackboneArchitecture):
    section = "detection"
    option_keys = ("channels", "head_channels", "max_detections", "nms_iou", "score_threshold")
    modules = ("pyramid", "head")

    def make(self, backbone, arch):
        return DetectionViT(backbone, arch["num_classes"], arch["img_size"], arch.get("channels", 64),
                            arch.get("head_channels", 64))


ARCHITECTURE = DetectorArchitecture()
