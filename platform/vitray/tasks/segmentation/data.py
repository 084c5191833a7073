"""Segmentation rows: a PNG mask of class ids (255 = ignore) that every geometric op moves with the pixels.

Evaluation and inference resize the whole image to the model's input (no centre crop: a border is pixels to label
too); predictions are mapped back to the original size by the inference head.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from vitray.data.decode import decode_mask
from vitray.data.formats import IGNORE_INDEX
from vitray.data.transforms import ResizeTransform
from vitray.tasks.codec import Codec

__all__ = ["CODEC"]


class SegmentationCodec(Codec):
    photometric_only_targets = False
    counted = "images containing it"

    def fields(self):
        return [pa.field("mask", pa.binary())]

    def pack_row(self, sample):
        return {"mask": sample.mask}, sorted(set(decode_mask(sample.mask).ravel().tolist()) - {IGNORE_INDEX})

    def coco_class_names(self, names: list[str]) -> list[str]:
        return ["background"] + names  # mask value 0; category k is k + 1

    def from_coco(self, objs: list[dict], h: int, w: int, cat_index: dict) -> dict:
        """The COCO objects painted into one class-id mask (small objects last, on top; crowd regions ignored)."""
        from vitray.data.sources import _png, _rasterise

        mask = np.zeros((h, w), dtype=np.uint8)
        for a in sorted(objs, key=lambda a: -a.get("area", 0)):
            if "segmentation" not in a:
                continue
            m = _rasterise(a["segmentation"], h, w).astype(bool)
            mask[m] = IGNORE_INDEX if a.get("iscrowd") else cat_index[a["category_id"]] + 1
        return {"mask": _png(mask)}

    def begin(self, batch, n, img_size, max_boxes):
        return {"mask": np.full((n, img_size, img_size), IGNORE_INDEX, dtype=np.uint8)}

    def read(self, batch, i, img):
        mask = decode_mask(batch["mask"][i])
        if mask.shape != img.shape[:2]:  # reduced-size decode: bring the image back to the mask's grid
            img = np.asarray(Image.fromarray(img).resize(mask.shape[::-1], Image.BICUBIC))
        return img, mask

    def transform(self, t, img, target):
        img, _, _, mask = t(img, mask=target)
        return img, mask

    def store(self, out, i, target):
        out["mask"][i] = target

    def eval_transform(self, img_size, crop_pct, interpolation):
        return ResizeTransform(img_size, interpolation=interpolation)


CODEC = SegmentationCodec()
