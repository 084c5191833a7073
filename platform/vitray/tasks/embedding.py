"""Embeddings: the pooled features of a model's ViT encoder, for retrieval, clustering and probing.

Any export has them: a classifier's pre-logits features (after pooling and the final norm, before the head), a
segmenter's or detector's backbone pooled the same way, an MAE encoder's own output. :func:`embedder` wraps a model to
return them; :class:`EmbeddingHead` is the inference head that turns them into answers:

* HTTP (the ``mae`` task's ``POST /v1/embed``): ``{model, version, alias, dim, embedding}``;
* MLflow pyfunc: one row per image, ``embedding`` (float32 array);
* ``vitray embed`` / ``vitray score`` of an MAE model: ``embedding`` list<float32> (null in error rows).

The image is prepared as the model's own task prepares it (its eval transform), so an embedding is of what the
model sees when it answers.
"""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from vitray.tasks.infer_base import InferenceHead, eval_input

__all__ = ["EmbeddingHead", "EmbedParams", "EmbedResponse", "embedder", "embedding_head_of"]


class EmbedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = Field(False, description="scale the embedding to unit L2 norm (cosine similarity = dot product)")


class EmbedResponse(BaseModel):
    model: str
    version: str | None
    alias: str | None
    dim: int
    embedding: list[float]


def _encoder(model):
    return getattr(model, "backbone", model)


def embedder(model):
    """``model`` -> a module whose forward gives (N, D) pooled encoder features: a timm ViT's, or the ``backbone``'s
    of a segmenter/detector (torch is imported here, so this module imports without it)."""
    import torch
    from torch import nn

    class Embedder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.encoder = _encoder(inner)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            e = self.encoder
            return e.forward_head(e.forward_features(x), pre_logits=True)

    return Embedder(model)


class EmbeddingHead(InferenceHead):
    Params = EmbedParams
    Response = EmbedResponse
    summary = "Embed one image: the pooled features of the model's ViT encoder"
    numpy_outputs = True

    def __init__(self, codec, prepare=None):
        self.codec = codec
        self._prepare = prepare

    def prepare(self, rgb: np.ndarray, meta: dict) -> np.ndarray:
        return self._prepare(rgb, meta) if self._prepare is not None else eval_input(rgb, meta, self.codec)

    def postprocess(self, outputs, sizes, meta) -> np.ndarray:
        """(N, D) features (a tensor, or numpy from the onnx runtime) -> (N, D) float32 rows."""
        if isinstance(outputs, np.ndarray):
            return outputs.astype(np.float32, copy=False)
        return outputs.float().cpu().numpy()

    def respond(self, emb: np.ndarray, size, params: EmbedParams, meta: dict) -> dict:
        v = np.asarray(emb, dtype=np.float32)
        if params.normalize:
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        return {"dim": int(v.shape[0]), "embedding": v.tolist()}

    def frame(self, results, sizes, meta):
        import pandas as pd

        return pd.DataFrame({"embedding": [np.asarray(r, dtype=np.float32) for r in results]})

    # ------------------------------------------------------------------------------------------- scoring
    def score_fields(self, options: dict) -> list:
        import pyarrow as pa

        return [("embedding", pa.list_(pa.float32()))]

    def score_outputs(self, results, ok: np.ndarray, meta: dict, options: dict) -> dict:
        col = np.empty(len(ok), dtype=object)
        it = iter(results)
        for i in range(len(ok)):
            col[i] = np.asarray(next(it), dtype=np.float32) if ok[i] else None
        return {"embedding": col}

    def score_columns(self, cols: dict, good: list[bool], meta: dict) -> dict:
        import pyarrow as pa

        return {"embedding": pa.array([np.asarray(v, dtype=np.float32) if g else None
                                       for v, g in zip(cols["embedding"], good)], pa.list_(pa.float32()))}

    def summary_of(self, body: dict) -> str:
        return f"a {body['dim']}-d embedding"

    def describe(self, meta: dict) -> str:
        return "pooled encoder embeddings (a backbone, not a classifier)"


def embedding_head_of(task_head) -> EmbeddingHead:
    """``vitray embed`` of any export: embeddings of the image its own task would answer about."""
    if isinstance(task_head, EmbeddingHead):
        return task_head
    return EmbeddingHead(task_head.codec, prepare=task_head.prepare)
