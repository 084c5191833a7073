"""MAE rows: the image alone. Any pack trains it (labels, masks and boxes are not read); an unlabeled pack (a flat
folder of images, ``vitray data pack --format imagefolder``) has no task columns at all."""
from __future__ import annotations

from vitray.tasks.codec import Codec

__all__ = ["CODEC"]


class MaeCodec(Codec):
    counted = "images"

    def pack_row(self, sample):
        return {}, []


CODEC = MaeCodec()
