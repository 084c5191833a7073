"""Segmentation answers: a class-index mask at the original image's size, and each class's pixel area.

The whole image is resized to the model's input (no crop), the logits are resized back to the original size
(bilinear) before the per-pixel argmax, so the mask lines up with the image the caller sent, whatever its size.

* HTTP ``POST /v1/segment``: ``{model, version, alias, image: {width, height}, labels, mask_png, class_areas}``,
  ``mask_png`` a base64 PNG of class ids; ``?format=rle`` gives ``rle``: per-class COCO RLE (pycocotools) instead;
* MLflow pyfunc: one row per image, ``mask`` (PNG bytes), ``width``, ``height``, ``class_areas`` (JSON text);
* ``vitray score``: ``mask`` (PNG bytes), ``width``, ``height``, ``class_areas`` (map class name -> pixels).
"""
from __future__ import annotations

import base64
import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vitray.tasks.infer_base import InferenceHead, per_row, png_bytes
from vitray.tasks.segmentation.data import CODEC

__all__ = ["HEAD", "SegmentParams", "SegmentResponse", "class_areas"]

UPSAMPLE_MAX_PIXELS = 4_000_000  # logits are resized bilinearly up to this many pixels, then nearest to the original


class SegmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["png", "rle"] = Field("png", description="png: mask_png, a base64 PNG of class ids; rle: "
                                                             "per-class COCO RLE")


class ImageSize(BaseModel):
    width: int
    height: int


class ClassRle(BaseModel):
    label: str
    class_id: int
    size: list[int]
    counts: str


class SegmentResponse(BaseModel):
    model: str
    version: str | None
    alias: str | None
    image: ImageSize
    labels: list[str]
    class_areas: dict[str, int]
    mask_png: str | None = None
    rle: list[ClassRle] | None = None


def class_areas(mask: np.ndarray, names: list[str]) -> dict[str, int]:
    """Pixels per class present in ``mask``, by class name."""
    counts = np.bincount(mask.ravel(), minlength=len(names))
    return {(names[i] if i < len(names) else str(i)): int(c) for i, c in enumerate(counts) if c}


def _resize_logits(logits, size: tuple[int, int]):
    import torch.nn.functional as F

    h, w = size
    scale = min(1.0, (UPSAMPLE_MAX_PIXELS / max(h * w, 1)) ** 0.5)
    inner = (max(1, round(h * scale)), max(1, round(w * scale)))
    out = F.interpolate(logits[None], size=inner, mode="bilinear", align_corners=False)[0].argmax(0)
    if inner != (h, w):  # a huge image: class ids nearest-resized the rest of the way (no C x H x W float tensor)
        out = F.interpolate(out[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    return out


class SegmentationHead(InferenceHead):
    Params = SegmentParams
    Response = SegmentResponse
    codec = CODEC
    summary = "Segment one image: a class id per pixel of the original image"

    def postprocess(self, outputs, sizes, meta) -> list[np.ndarray]:
        """(N, classes, S, S) logits -> per image, a (H, W) uint8 class-index mask at its original size."""
        sizes = sizes or [tuple(outputs.shape[-2:])] * len(outputs)
        return [_resize_logits(outputs[i], tuple(size)).to("cpu").numpy().astype(np.uint8)
                for i, size in enumerate(sizes)]

    def respond(self, mask: np.ndarray, size, params: SegmentParams, meta: dict) -> dict:
        names = list(meta.get("class_names") or [])
        h, w = mask.shape
        out = {"image": {"width": int(w), "height": int(h)}, "labels": names, "class_areas": class_areas(mask, names)}
        if params.format == "rle":
            from pycocotools import mask as coco_mask

            out["rle"] = []
            for i in np.unique(mask).tolist():
                rle = coco_mask.encode(np.asfortranarray(mask == i, dtype=np.uint8))
                out["rle"].append({"label": names[i] if i < len(names) else str(i), "class_id": int(i),
                                   "size": [int(h), int(w)], "counts": rle["counts"].decode("utf-8")})
        else:
            out["mask_png"] = base64.b64encode(png_bytes(mask)).decode("ascii")
        return out

    def frame(self, results, sizes, meta):
        import pandas as pd

        names = list(meta.get("class_names") or [])
        return pd.DataFrame({"mask": [png_bytes(m) for m in results],
                             "width": np.asarray([m.shape[1] for m in results], dtype=np.int64),
                             "height": np.asarray([m.shape[0] for m in results], dtype=np.int64),
                             "class_areas": [json.dumps(class_areas(m, names)) for m in results]})

    # ------------------------------------------------------------------------------------------- scoring
    def score_fields(self, options: dict) -> list:
        import pyarrow as pa

        return [("mask", pa.binary()), ("width", pa.int32()), ("height", pa.int32()),
                ("class_areas", pa.map_(pa.string(), pa.int64()))]

    def score_outputs(self, results, ok: np.ndarray, meta: dict, options: dict) -> dict[str, np.ndarray]:
        names = list(meta.get("class_names") or [])
        (masks, areas), sizes = per_row(results, ok, lambda m: ((png_bytes(m), json.dumps(class_areas(m, names))),
                                                                m.shape), (b"", ""))
        return {"mask": masks, "class_areas": areas, "mask_hw": sizes}

    def score_columns(self, cols: dict, good: list[bool], meta: dict) -> dict:
        import pyarrow as pa

        return {
            "mask": pa.array([bytes(m) if g else None for m, g in zip(cols["mask"], good)], pa.binary()),
            "width": pa.array([int(s[1]) if g else None for s, g in zip(cols["mask_hw"], good)], pa.int32()),
            "height": pa.array([int(s[0]) if g else None for s, g in zip(cols["mask_hw"], good)], pa.int32()),
            "class_areas": pa.array([list(json.loads(a).items()) if g else None for a, g in zip(cols["class_areas"], good)],
                                    pa.map_(pa.string(), pa.int64())),
        }

    def summary_of(self, body: dict) -> str:
        areas = ", ".join(f"{k} {v}" for k, v in sorted(body["class_areas"].items(), key=lambda kv: -kv[1]))
        return f"a {body['image']['width']}x{body['image']['height']} mask ({areas} px)"

    def describe(self, meta: dict) -> str:
        return f"{len(meta.get('class_names') or [])} classes, masks at the original size"


HEAD = SegmentationHead()
