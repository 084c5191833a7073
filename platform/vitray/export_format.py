"""What an export folder is, readable without torch: its metadata file and the checks on it.

An export folder holds ``vitray_model.json`` (task, architecture, class names, preprocessing, metrics) beside the
model itself: ``model.safetensors`` for PyTorch (:mod:`vitray.models.export`), or ``model.onnx`` /
``model.int8.onnx`` for ONNX Runtime (:mod:`vitray.onnx_export`, :mod:`vitray.onnx_runtime`). Serving an ONNX
export reads it through here, so a serving image without torch can.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["EXPORT_META", "EXPORT_VERSION", "ExportError", "read_export_meta"]

EXPORT_META = "vitray_model.json"
EXPORT_VERSION = 1


class ExportError(ValueError):
    pass


def read_export_meta(folder: str | Path) -> dict:
    path = Path(folder).expanduser() / EXPORT_META
    if not path.is_file():
        raise ExportError(f"{folder}: not a vitray export folder (no {EXPORT_META})")
    meta = json.loads(path.read_text())
    if meta.get("format") != "vitray-model" or meta.get("format_version", 0) > EXPORT_VERSION:
        raise ExportError(f"{path}: unsupported export format {meta.get('format')} v{meta.get('format_version')}")
    return meta
