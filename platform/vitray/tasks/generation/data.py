"""Generation rows: the image and its caption. Packs with a ``caption`` column (``vitray data pack captions.json
--format coco --task generation``, e.g. from ``vitray data compose --captions``) and classification packs (whose
rows are captioned with their class name by the training task) both train it.

Captions travel through the pipeline as fixed-width UTF-8 bytes (``caption`` (N, CAPTION_BYTES) uint8, zero
padded): tensors, as every batch column is; the trainer decodes them. Labels travel as ``label`` (-1: none).
Images are resized whole, never cropped or flipped: a caption says where things are.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from vitray.data.transforms import ResizeTransform
from vitray.tasks.codec import Codec

__all__ = ["CODEC", "CAPTION_BYTES", "decode_captions", "encode_caption"]

CAPTION_BYTES = 256


def encode_caption(text: str) -> np.ndarray:
    """UTF-8, cut at a character boundary to fit CAPTION_BYTES, zero padded."""
    raw = text.encode("utf-8")[:CAPTION_BYTES].decode("utf-8", "ignore").encode("utf-8")
    out = np.zeros(CAPTION_BYTES, dtype=np.uint8)
    out[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return out


def decode_captions(rows) -> list[str]:
    """(N, CAPTION_BYTES) uint8 (numpy or torch) -> strings ("" where a row has none)."""
    a = np.asarray(rows.cpu() if hasattr(rows, "cpu") else rows, dtype=np.uint8)
    return [bytes(r).rstrip(b"\0").decode("utf-8", "ignore") for r in a]


class GenerationCodec(Codec):
    class_column = None
    optional_columns = ("caption", "label")
    bounded_labels = False
    counted = "images"
    coco_categories = False  # its COCO files are COCO captions

    def fields(self):
        return [pa.field("caption", pa.string())]

    def read_columns(self):
        return ["caption", "label"]

    def pack_row(self, sample):
        return {"caption": sample.caption or ""}, []

    def coco_class_names(self, names):
        return list(names)

    def from_coco(self, objs, h, w, cat_index):
        """COCO captions (``annotations`` of ``{image_id, caption}``): the image's first caption."""
        caps = [a["caption"] for a in objs if isinstance(a.get("caption"), str) and a["caption"].strip()]
        return {"caption": caps[0].strip()} if caps else "no caption in the annotations"

    def begin(self, batch, n, img_size, max_boxes):
        caps = np.zeros((n, CAPTION_BYTES), dtype=np.uint8)
        if "caption" in batch:
            for i, text in enumerate(batch["caption"]):
                if text is not None:
                    caps[i] = encode_caption(str(text))
        labels = np.asarray(batch["label"], dtype=np.int64) if "label" in batch else np.full(n, -1, dtype=np.int64)
        return {"caption": caps, "label": labels}

    def transform(self, t, img, target):
        img, _, _, _ = ResizeTransform(t.size[0], interpolation=t.interpolation)(img)
        return img, target

    def eval_transform(self, img_size, crop_pct, interpolation):
        return ResizeTransform(img_size, interpolation=interpolation)


CODEC = GenerationCodec()
