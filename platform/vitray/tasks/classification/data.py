"""Classification rows: a ``label`` int per image; augmentations may be photometric (RandAugment)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from vitray.tasks.codec import Codec

__all__ = ["CODEC"]


class ClassificationCodec(Codec):
    class_column = "label"

    def fields(self):
        return [pa.field("label", pa.int32())]

    def pack_row(self, sample):
        return {"label": sample.label}, [sample.label]

    def begin(self, batch, n, img_size, max_boxes):
        return {"label": np.asarray(batch["label"], dtype=np.int64)}


CODEC = ClassificationCodec()
