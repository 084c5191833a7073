"""Classification answers: class probabilities of the centre crop (the val transform).

* HTTP ``POST /v1/classify``: ``{model, version, alias, predictions: [{label, name, score}], probs?}``
  (``top_k``, ``probs`` parameters);
* MLflow pyfunc: one row per image, ``label``, ``name``, ``probs``;
* ``vitray score``: ``label``, ``name``, ``score`` and the ``top_k`` labels, names and probabilities.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vitray.tasks.classification.data import CODEC
from vitray.tasks.infer_base import InferenceHead

__all__ = ["HEAD", "ClassifyParams", "ClassifyResponse"]


class ClassifyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(5, ge=1, le=10_000, description="how many classes to return")
    probs: bool = Field(False, description="also return every class probability")


class Prediction(BaseModel):
    label: int
    name: str
    score: float


class ClassifyResponse(BaseModel):
    model: str
    version: str | None
    alias: str | None
    predictions: list[Prediction]
    probs: list[float] | None = None


def _name(names: list[str], i: int) -> str:
    return names[i] if 0 <= i < len(names) else str(i)


class ClassificationHead(InferenceHead):
    Params = ClassifyParams
    Response = ClassifyResponse
    codec = CODEC
    summary = "Classify one image"
    numpy_outputs = True

    def postprocess(self, outputs, sizes, meta) -> np.ndarray:
        """(N, classes) logits (a tensor, or numpy from the onnx runtime) -> (N, classes) float32 probabilities (rows
        are the answers)."""
        if isinstance(outputs, np.ndarray):
            z = outputs.astype(np.float32) - outputs.max(axis=-1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=-1, keepdims=True)
        import torch

        return torch.softmax(outputs.float(), dim=-1).cpu().numpy()

    def respond(self, probs: np.ndarray, size, params: ClassifyParams, meta: dict) -> dict:
        names = list(meta.get("class_names") or [])
        top = np.argsort(-probs, kind="stable")[:min(params.top_k, len(probs))]
        out = {"predictions": [{"label": int(i), "name": _name(names, int(i)), "score": float(probs[i])} for i in top]}
        if params.probs:
            out["probs"] = probs.tolist()
        return out

    def frame(self, results, sizes, meta):
        import pandas as pd

        probs = np.asarray(results, dtype=np.float32).reshape(len(results), -1)
        labels = probs.argmax(axis=1).astype(np.int64) if len(probs) else np.zeros(0, dtype=np.int64)
        names = [_name(list(meta.get("class_names") or []), int(i)) for i in labels]
        return pd.DataFrame({"label": labels, "name": names, "probs": list(probs)})

    # ------------------------------------------------------------------------------------------- scoring
    def score_fields(self, options: dict) -> list:
        import pyarrow as pa

        return [("label", pa.int32()), ("name", pa.string()), ("score", pa.float32()),
                ("top_k_labels", pa.list_(pa.int32())), ("top_k_names", pa.list_(pa.string())),
                ("top_k_probs", pa.list_(pa.float32()))]

    def score_outputs(self, results, ok: np.ndarray, meta: dict, options: dict) -> dict[str, np.ndarray]:
        """In the scoring actors: fixed-width arrays for every row (error rows: -1 / NaN)."""
        n = len(ok)
        k = min(int(options.get("top_k", 5)), len(meta.get("class_names") or []) or int(options.get("top_k", 5)))
        labels = np.full((n, k), -1, dtype=np.int32)
        probs = np.full((n, k), np.nan, dtype=np.float32)
        if ok.any():
            p = np.asarray(results)
            order = np.argsort(-p, axis=1, kind="stable")[:, :k]
            labels[ok] = order
            probs[ok] = np.take_along_axis(p, order, axis=1)
        return {"top_k_labels": labels, "top_k_probs": probs}

    def score_columns(self, cols: dict, good: list[bool], meta: dict) -> dict:
        """On the driver: a complete unit's columns as pyarrow arrays (None for error rows)."""
        import pyarrow as pa

        names = list(meta.get("class_names") or [])
        labels, probs = cols["top_k_labels"], cols["top_k_probs"]
        return {
            "label": pa.array([int(r[0]) if g else None for r, g in zip(labels, good)], pa.int32()),
            "name": pa.array([_name(names, int(r[0])) if g else None for r, g in zip(labels, good)], pa.string()),
            "score": pa.array([float(r[0]) if g else None for r, g in zip(probs, good)], pa.float32()),
            "top_k_labels": pa.array([r.tolist() if g else None for r, g in zip(labels, good)], pa.list_(pa.int32())),
            "top_k_names": pa.array([[_name(names, int(i)) for i in r] if g else None for r, g in zip(labels, good)],
                                    pa.list_(pa.string())),
            "top_k_probs": pa.array([r.tolist() if g else None for r, g in zip(probs, good)], pa.list_(pa.float32())),
        }

    def summary_of(self, body: dict) -> str:
        top = body["predictions"][0]
        return f"{top['name']!r} (p={top['score']:.3f})"


HEAD = ClassificationHead()
