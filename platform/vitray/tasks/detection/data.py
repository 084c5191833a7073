"""Detection rows: boxes (x0, y0, x1, y1 in stored pixels), their labels and crowd flags, padded to ``max_boxes``.

COCO's crowd annotations (``iscrowd``: one box over a crowd of objects) are kept as crowd boxes: training neither
rewards nor punishes detections inside them and evaluation ignores detections matched to them, as COCO's evaluator
does. Geometric augmentation clips boxes to the crop and drops those left empty. Evaluation and inference resize the
whole image to the model's input (no centre crop: a box near the border must stay in the picture); ``orig_size``
(the decoded image's height and width) lets evaluation map boxes back, so COCO's small/medium/large areas are the
original image's.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from vitray.data.transforms import ResizeTransform
from vitray.tasks.codec import Codec

__all__ = ["CODEC"]


class DetectionCodec(Codec):
    photometric_only_targets = False
    class_column = "box_labels"
    counted = "boxes"
    bounded_labels = False
    optional_columns = ("box_crowd",)  # detection shards packed before crowd boxes were kept have none

    def fields(self):
        return [pa.field("boxes", pa.list_(pa.list_(pa.float32()))), pa.field("box_labels", pa.list_(pa.int32())),
                pa.field("box_crowd", pa.list_(pa.bool_()))]

    def read_columns(self):
        return ["boxes", "box_labels", "box_crowd", "width", "height"]  # boxes follow a reduced-size decode

    def pack_row(self, sample):
        labels = list(sample.box_labels or [])
        crowd = list(getattr(sample, "box_crowd", None) or [False] * len(labels))
        return ({"boxes": sample.boxes or [], "box_labels": labels, "box_crowd": crowd},
                [c for c, k in zip(labels, crowd) if not k])

    def coco_class_names(self, names: list[str]) -> list[str]:
        return names

    def from_coco(self, objs: list[dict], h: int, w: int, cat_index: dict) -> dict:
        """Boxes (clipped to the image), labels and crowd flags of a COCO image's objects."""
        boxes, labels, crowd = [], [], []
        for a in objs:
            x, y, bw, bh = a["bbox"]
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
            if x1 > x0 and y1 > y0:
                boxes.append([x0, y0, x1, y1])
                labels.append(cat_index[a["category_id"]])
                crowd.append(bool(a.get("iscrowd")))
        return {"boxes": boxes, "box_labels": labels, "box_crowd": crowd}

    def begin(self, batch, n, img_size, max_boxes):
        return {"boxes": np.zeros((n, max_boxes, 4), dtype=np.float32),
                "box_labels": np.full((n, max_boxes), -1, dtype=np.int64),
                "box_crowd": np.zeros((n, max_boxes), dtype=bool),
                "orig_size": np.zeros((n, 2), dtype=np.int64)}

    def read(self, batch, i, img):
        boxes = np.asarray([np.asarray(b, dtype=np.float32) for b in batch["boxes"][i]], dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(batch["box_labels"][i], dtype=np.int64).reshape(-1)
        crowd_col = batch.get("box_crowd")
        crowd = np.asarray(crowd_col[i] if crowd_col is not None and crowd_col[i] is not None else
                           np.zeros(len(labels)), dtype=bool).reshape(-1)
        # boxes are in stored pixels; the decoder may have scaled the image down (JPEG DCT scaling)
        if len(boxes) and "width" in batch:
            sx, sy = img.shape[1] / float(batch["width"][i]), img.shape[0] / float(batch["height"][i])
            boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        return img, (boxes, np.stack([labels, crowd.astype(np.int64)], axis=1), img.shape[:2])

    def transform(self, t, img, target):
        boxes, labels, size = target
        img, boxes, labels, _ = t(img, boxes, labels)  # labels carry (class, crowd) so dropped boxes drop both
        return img, (boxes, labels, size)

    def store(self, out, i, target):
        boxes, labels, size = target
        k = min(len(boxes), out["boxes"].shape[1])
        out["boxes"][i, :k] = boxes[:k]
        out["box_labels"][i, :k] = labels[:k, 0]
        out["box_crowd"][i, :k] = labels[:k, 1].astype(bool)
        out["orig_size"][i] = size

    def eval_transform(self, img_size, crop_pct, interpolation):
        return ResizeTransform(img_size, interpolation=interpolation)


CODEC = DetectionCodec()
