"""Detection answers: boxes with labels and scores, in the original image's pixels.

The whole image is resized to the model's input (no crop, as evaluation does); decoded boxes are scaled back by the
image's own width and height ratios, so they line up with the image the caller sent, whatever its size or aspect.
Decoding (peaks, top-k, class-wise NMS) uses the settings stored in the export; ``score_threshold`` (default: the
export's ``detection.score_threshold``) and ``max_detections`` filter the answer.

* HTTP ``POST /v1/detect``: ``{model, version, alias, image: {width, height}, detections: [{label, class_id, score,
  box: {xmin, ymin, xmax, ymax}}]}``; ``?format=coco``: ``results``, COCO result records (``image_id`` from the
  ``image_id`` parameter, ``category_id`` the COCO file's own category id when the model was trained on a COCO pack,
  else class id + 1; ``bbox`` xywh);
* MLflow pyfunc: one row per image, ``boxes`` (xyxy lists), ``scores``, ``labels``, ``names``, ``width``, ``height``;
* ``vitray score``: ``detections`` (a list of {label, class_id, score, xmin, ymin, xmax, ymax} structs), ``width``,
  ``height``.
"""
from __future__ import annotations

import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vitray.tasks.detection.data import CODEC
from vitray.tasks.infer_base import InferenceHead, per_row

__all__ = ["HEAD", "DetectParams", "DetectResponse"]

DECODE_MIN_SCORE = 0.001  # decoded candidates below this are never answers


class DetectParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score_threshold: float | None = Field(None, ge=0.0, le=1.0, description="minimum score (default: the model's "
                                                                            "detection.score_threshold)")
    max_detections: int | None = Field(None, ge=1, le=10_000, description="at most this many, best first (default "
                                                                          "and ceiling: the model's max_detections)")
    format: Literal["json", "coco"] = Field("json", description="json: detections with named boxes; coco: COCO "
                                                                "result records (bbox xywh)")
    image_id: int = Field(0, description="the image_id of COCO result records")


class ImageSize(BaseModel):
    width: int
    height: int


class Box(BaseModel):
    xmin: float
    ymin: float
    xmax: float
    ymax: float


class Detection(BaseModel):
    label: str
    class_id: int
    score: float
    box: Box


class CocoResult(BaseModel):
    image_id: int
    category_id: int
    bbox: list[float]
    score: float


class DetectResponse(BaseModel):
    model: str
    version: str | None
    alias: str | None
    image: ImageSize
    detections: list[Detection] | None = None
    results: list[CocoResult] | None = None


def _name(names: list[str], i: int) -> str:
    return names[i] if 0 <= i < len(names) else str(i)


def _keep(answer: dict, threshold: float, limit: int) -> np.ndarray:
    return np.flatnonzero(answer["scores"] >= threshold)[:limit]  # answers are sorted best first


class DetectionHead(InferenceHead):
    Params = DetectParams
    Response = DetectResponse
    codec = CODEC
    summary = "Detect objects in one image: boxes in the original image's pixels"

    def postprocess(self, outputs, sizes, meta) -> list[dict]:
        """(N, classes + 4, h, w) outputs -> per image {boxes (K, 4) xyxy float32 in original pixels, scores, labels},
        best first."""
        from vitray.models.centernet import centernet_decode
        from vitray.models.detection import pyramid_strides

        arch = meta["model"]
        s = int(meta["preprocessing"]["img_size"])
        dets = centernet_decode(outputs, pyramid_strides(s)[0], (s, s), k=int(arch.get("max_detections", 100)),
                                nms_iou=arch.get("nms_iou"), min_score=DECODE_MIN_SCORE)
        out = []
        for i, (boxes, scores, labels) in enumerate(dets):
            h, w = sizes[i] if sizes else (s, s)
            scale = np.array([w / s, h / s, w / s, h / s], dtype=np.float32)
            out.append({"boxes": boxes.cpu().numpy().astype(np.float32) * scale,
                        "scores": scores.cpu().numpy().astype(np.float32),
                        "labels": labels.cpu().numpy().astype(np.int64), "size": (int(h), int(w))})
        return out

    @staticmethod
    def _threshold(meta: dict, params: DetectParams | None = None) -> tuple[float, int]:
        arch = meta["model"]
        threshold = params.score_threshold if params is not None and params.score_threshold is not None else \
            float(arch.get("score_threshold", 0.25))
        ceiling = int(arch.get("max_detections", 100))
        limit = min(params.max_detections, ceiling) if params is not None and params.max_detections else ceiling
        return threshold, limit

    def _records(self, answer: dict, meta: dict, params: DetectParams | None = None) -> list[dict]:
        names = list(meta.get("class_names") or [])
        threshold, limit = self._threshold(meta, params)
        return [{"label": _name(names, int(answer["labels"][j])), "class_id": int(answer["labels"][j]),
                 "score": float(answer["scores"][j]),
                 **dict(zip(("xmin", "ymin", "xmax", "ymax"), (float(v) for v in answer["boxes"][j])))}
                for j in _keep(answer, threshold, limit)]

    def respond(self, answer: dict, size, params: DetectParams, meta: dict) -> dict:
        h, w = size
        records = self._records(answer, meta, params)
        out = {"image": {"width": int(w), "height": int(h)}}
        if params.format == "coco":
            ids = meta.get("category_ids") or list(range(1, len(meta.get("class_names") or []) + 1))
            out["results"] = [{"image_id": params.image_id, "score": r["score"],
                               "category_id": ids[r["class_id"]] if r["class_id"] < len(ids) else r["class_id"] + 1,
                               "bbox": [r["xmin"], r["ymin"], r["xmax"] - r["xmin"], r["ymax"] - r["ymin"]]}
                              for r in records]
        else:
            out["detections"] = [{"label": r["label"], "class_id": r["class_id"], "score": r["score"],
                                  "box": {k: r[k] for k in ("xmin", "ymin", "xmax", "ymax")}} for r in records]
        return out

    def frame(self, answers, sizes, meta):
        import pandas as pd

        rows = [self._records(a, meta) for a in answers]
        return pd.DataFrame({
            "boxes": [[[r["xmin"], r["ymin"], r["xmax"], r["ymax"]] for r in rs] for rs in rows],
            "scores": [[r["score"] for r in rs] for rs in rows],
            "labels": [[r["class_id"] for r in rs] for rs in rows],
            "names": [[r["label"] for r in rs] for rs in rows],
            "width": np.asarray([s[1] for s in sizes], dtype=np.int64),
            "height": np.asarray([s[0] for s in sizes], dtype=np.int64)})

    # ------------------------------------------------------------------------------------------- scoring
    _STRUCT = (("label", "string"), ("class_id", "int32"), ("score", "float32"), ("xmin", "float32"),
               ("ymin", "float32"), ("xmax", "float32"), ("ymax", "float32"))

    def _struct(self):
        import pyarrow as pa

        return pa.struct([(k, getattr(pa, t)()) for k, t in self._STRUCT])

    def score_fields(self, options: dict) -> list:
        import pyarrow as pa

        return [("detections", pa.list_(self._struct())), ("width", pa.int32()), ("height", pa.int32())]

    def score_outputs(self, answers, ok: np.ndarray, meta: dict, options: dict) -> dict[str, np.ndarray]:
        (dets,), sizes = per_row(answers, ok, lambda a: ((json.dumps(self._records(a, meta)),), a["size"]), ("",))
        return {"detections": dets, "image_hw": sizes}

    def score_columns(self, cols: dict, good: list[bool], meta: dict) -> dict:
        import pyarrow as pa

        return {
            "detections": pa.array([json.loads(d) if g else None for d, g in zip(cols["detections"], good)],
                                   pa.list_(self._struct())),
            "width": pa.array([int(s[1]) if g else None for s, g in zip(cols["image_hw"], good)], pa.int32()),
            "height": pa.array([int(s[0]) if g else None for s, g in zip(cols["image_hw"], good)], pa.int32()),
        }

    def summary_of(self, body: dict) -> str:
        dets = body.get("detections") or []
        what = ", ".join(f"{d['label']} {d['score']:.2f}" for d in dets[:5]) + (" ..." if len(dets) > 5 else "")
        return f"{len(dets)} boxes in a {body['image']['width']}x{body['image']['height']} image ({what or 'none'})"

    def describe(self, meta: dict) -> str:
        return f"{len(meta.get('class_names') or [])} classes, boxes in the original image's pixels"


HEAD = DetectionHead()
