"""An ONNX export run by ONNX Runtime on CPU, without torch: what ``serve.runtime: onnx`` and
``vitray score --runtime onnx`` load.

An ONNX export folder (written by ``vitray export --format onnx``, :mod:`vitray.onnx_export`) holds the graph of the
model's forward, normalised float32 ``image`` (N, 3, S, S) in, the task's raw ``outputs`` out (a dynamic batch axis),
and the export metadata beside it (``vitray_model.json``: task, class names, preprocessing, and an ``onnx`` record
of the files, opset, exporter and the parity measured against PyTorch when it was written). Preprocessing and
post-processing stay outside the graph, in the task's inference head, exactly as with PyTorch.

``precision`` picks the graph: ``fp32`` (``model.onnx``; also what ``auto`` means here) or ``int8``
(``model.int8.onnx``: linear layers dynamically quantized, written by ``--int8``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vitray.export_format import ExportError, read_export_meta

__all__ = ["ONNX_FILES", "ONNX_INPUT", "ONNX_OUTPUT", "OnnxModel", "onnx_precision"]

ONNX_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
ONNX_INPUT = "image"
ONNX_OUTPUT = "outputs"


def onnx_precision(precision: str) -> str:
    """The graph a precision asks for: ``auto``/``fp32`` -> fp32, ``int8`` -> int8 (bf16/fp16 are torch's)."""
    if precision in ("auto", "fp32"):
        return "fp32"
    if precision == "int8":
        return "int8"
    raise ValueError(f"precision {precision!r} is not one the onnx runtime has (fp32, int8, or auto = fp32)")


class OnnxModel:
    """``model(x)``: float32 (N, 3, S, S) numpy -> the graph's float32 outputs (numpy). ``threads``: ONNX Runtime's
    intra-op threads (default: the CPUs this process may use)."""

    runtime = "onnx"

    def __init__(self, folder: str | Path, precision: str = "auto", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("the onnx runtime needs onnxruntime: pip install onnxruntime") from None
        folder = Path(folder).expanduser()
        self.meta = read_export_meta(folder)
        record = self.meta.get("onnx")
        if not record:
            raise ExportError(f"{folder}: a PyTorch export with no ONNX graph; write one with "
                              f"`vitray export {folder} --format onnx -o DIR` (add --int8 for the int8 graph)")
        self.precision = onnx_precision(precision)
        name = (record.get("files") or {}).get(self.precision)
        if not name or not (folder / name).is_file():
            extra = " (export with --int8)" if self.precision == "int8" else ""
            raise ExportError(f"{folder}: no {self.precision} ONNX graph{extra}")
        self.path = folder / name
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or len(os.sched_getaffinity(0)))
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
