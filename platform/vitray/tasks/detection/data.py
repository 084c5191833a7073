"""Detection rows: boxes (x0, y0, x1, y1 in stored pixels) and labels, padded to ``max_boxes`` (label -1)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from vitray.tasks.codec import Codec

__all__ = ["CODEC"]


class DetectionCodec(Codec):
    photometric_only_targets = False
    class_column = "box_labels"
    counted = "boxes"
    bounded_labels = False

    def fields(self):
        return [pa.field("boxes", pa.list_(pa.list_(pa.float32()))), pa.field("box_labels", pa.list_(pa.int32()))]

    def read_columns(self):
        return ["boxes", "box_labels", "width", "height"]  # boxes are rescaled when the decoder shrinks the image

    def pack_row(self, sample):
        return {"boxes": sample.boxes, "box_labels": sample.box_labels}, list(sample.box_labels)

    def coco_class_names(self, names: list[str]) -> list[str]:
        return names

    def from_coco(self, objs: list[dict], h: int, w: int, cat_index: dict) -> dict:
        """Boxes (clipped to the image) and labels of a COCO image's objects; crowd regions are not objects."""
        boxes, labels = [], []
        for a in objs:
            if a.get("iscrowd"):
                continue
            x, y, bw, bh = a["bbox"]
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
            if x1 > x0 and y1 > y0:
                boxes.append([x0, y0, x1, y1])
                labels.append(cat_index[a["category_id"]])
        return {"boxes": boxes, "box_labels": labels}

    def begin(self, batch, n, img_size, max_boxes):
        return {"boxes": np.zeros((n, max_boxes, 4), dtype=np.float32),
                "box_labels": np.full((n, max_boxes), -1, dtype=np.int64)}

    def read(self, batch, i, img):
        boxes = np.asarray([np.asarray(b, dtype=np.float32) for b in batch["boxes"][i]], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(batch["box_labels"][i], dtype=np.int64).reshape(-1)
        # boxes are in stored pixels; the decoder may have scaled the image down (JPEG DCT scaling)
        if len(boxes) and "width" in batch:
            sx, sy = img.shape[1] / float(batch["width"][i]), img.shape[0] / float(batch["height"][i])
            boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        return img, (boxes, labels)

    def transform(self, t, img, target):
        img, boxes, labels, _ = t(img, *target)
        return img, (boxes, labels)

    def store(self, out, i, target):
        boxes, labels = target
        k = min(len(boxes), out["boxes"].shape[1])
        out["boxes"][i, :k] = boxes[:k]
        out["box_labels"][i, :k] = labels[:k]


CODEC = DetectionCodec()
