"""The data layer of a task: its shard columns, and how one row's targets follow the pixels (numpy/PIL only).

:func:`vitray.data.pipeline.decode_batch` drives a codec: ``begin`` allocates the batch's target arrays, then per
row ``read`` (the targets, aligned with the decoded image), ``transform`` (the train or eval transform applied to
image and targets together) and ``store``. The eval transform is the task's, and the same object prepares images
for inference (``vitray.predict``): what is validated is what is served.
"""
from __future__ import annotations

import numpy as np

__all__ = ["Codec"]


class Codec:
    #: timm RandAugment may run on this task's images (it would move pixels without moving boxes or masks)
    photometric_only_targets = True

    #: the shard column that holds class ids (a list column counts each element), for class-mix checks
    class_column: str | None = None
    #: columns read when a shard has them (added after shards of the task were first packed)
    optional_columns: tuple[str, ...] = ()
    #: what a class count counts, for `vitray data inspect`
    counted = "images"
    #: the class ids of every row are below the number of class names (checked when packing)
    bounded_labels = True

    def fields(self) -> list:
        """The task's pyarrow fields in a shard, after id/image/width/height/split."""
        return []

    def read_columns(self) -> list[str]:
        """The shard columns the training pipeline reads besides ``image``."""
        return [f.name for f in self.fields()]

    def pack_row(self, sample) -> tuple[dict, list[int]]:
        """A packed sample's task columns, and the class ids it holds (for the manifest's class counts)."""
        raise NotImplementedError

    def begin(self, batch: dict, n: int, img_size: int, max_boxes: int) -> dict[str, np.ndarray]:
        """The batch's target arrays (rows that fail to decode keep these values)."""
        return {}

    def read(self, batch: dict, i: int, img: np.ndarray):
        """(image, targets) of row ``i``, the targets aligned with ``img`` as decoded."""
        return img, None

    def transform(self, t, img: np.ndarray, target):
        img, _, _, _ = t(img)
        return img, target

    def store(self, out: dict, i: int, target) -> None:
        pass

    def eval_transform(self, img_size: int, crop_pct: float, interpolation: str):
        """What evaluation and inference do to an image (and its targets) before the model."""
        from vitray.data.transforms import EvalTransform

        return EvalTransform(img_size, crop_pct=crop_pct, interpolation=interpolation)
