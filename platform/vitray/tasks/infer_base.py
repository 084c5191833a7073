"""The inference head's interface, what every head shares, and PNG helpers.

A task's ``infer.HEAD`` turns an image into the model's input and the model's outputs into answers about the original
image, in every form vitray gives them: the HTTP route's response, the MLflow pyfunc's frame, ``vitray score``'s
columns. ``vitray.predict.Predictor`` drives it (decode, prepare, forward in batches, postprocess).
"""
from __future__ import annotations

import io

import numpy as np

__all__ = ["InferenceHead", "eval_input", "png_bytes", "per_row"]


def eval_input(rgb: np.ndarray, meta: dict, codec) -> np.ndarray:
    """(H, W, 3) uint8 -> the (3, S, S) uint8 model input: the task's eval transform, as validation applies it."""
    pre = meta["preprocessing"]
    t = codec.eval_transform(int(pre["img_size"]), pre["crop_pct"], pre["interpolation"])
    return np.ascontiguousarray(t(rgb)[0].transpose(2, 0, 1))


def png_bytes(mask: np.ndarray) -> bytes:
    """A (H, W) uint8 class-index mask as a single-channel PNG (what `vitray data pack --format masks` reads)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def per_row(answers, ok: np.ndarray, encode, empty: tuple) -> tuple[list[np.ndarray], np.ndarray]:
    """Scoring columns of variable-size answers: ``encode(answer)`` -> (value per column...) for each good row, the
    ``empty`` values in error rows; returns (one object array per column, (N, 2) int32 (height, width) sizes)."""
    n = len(ok)
    cols = [np.empty(n, dtype=object) for _ in empty]
    sizes = np.zeros((n, 2), dtype=np.int32)
    it = iter(answers)
    for i in range(n):
        values, size = encode(next(it)) if ok[i] else (empty, (0, 0))
        for col, value in zip(cols, values):
            col[i] = value
        sizes[i] = size
    return cols, sizes


class InferenceHead:
    """Params: the route's query parameters (a pydantic model, unknown keys refused); Response: its response model
    (OpenAPI); summary: the route's one-line description; codec: the task's data codec (its eval transform);
    numpy_outputs: ``postprocess`` takes numpy outputs as well as tensors, so the onnx runtime needs no torch."""

    Params = None
    Response = None
    summary = ""
    codec = None
    numpy_outputs = False

    def prepare(self, rgb: np.ndarray, meta: dict) -> np.ndarray:
        """(H, W, 3) uint8 at full size -> the (3, S, S) uint8 model input (the original size is kept by the caller)."""
        return eval_input(rgb, meta, self.codec)

    def postprocess(self, outputs, sizes: list[tuple[int, int]] | None, meta: dict):
        """The model's float outputs for a batch and each image's original (height, width) -> one answer each."""
        raise NotImplementedError

    def respond(self, answer, size, params, meta: dict) -> dict:
        """One answer as the HTTP route's JSON (model, version and alias are added by the server)."""
        raise NotImplementedError

    def frame(self, answers, sizes, meta: dict):
        """The MLflow pyfunc's pandas DataFrame, one row per image."""
        raise NotImplementedError

    def score_fields(self, options: dict) -> list:
        """``vitray score``'s task columns: (name, pyarrow type) pairs."""
        raise NotImplementedError

    def score_outputs(self, answers, ok: np.ndarray, meta: dict, options: dict) -> dict:
        """In the scoring actors: numpy columns for every row of a batch (``ok`` False: an error row)."""
        raise NotImplementedError

    def score_columns(self, cols: dict, good: list[bool], meta: dict) -> dict:
        """On the driver: a complete unit's columns as pyarrow arrays (None in error rows)."""
        raise NotImplementedError

    def summary_of(self, body: dict) -> str:
        """A few words about one HTTP answer (the quickstart prints them)."""
        return ""

    def describe(self, meta: dict) -> str:
        """A few words about a served model (``vitray serve`` prints them)."""
        return f"{len(meta.get('class_names') or [])} classes"
