"""The export folder: everything serving and scoring need, and nothing else (no optimizer, no DeepSpeed).

    model.safetensors     consolidated fp32 model-only weights
    vitray_model.json     task, architecture (what the task's ``model`` module builds it from), class names,
                          preprocessing, metrics

Written at the end of training, registered in MLflow, loaded by ``vitray.tracking`` for any model URI.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vitray.export_format import EXPORT_META, EXPORT_VERSION, ExportError, read_export_meta

from .checkpoint import EXPORT_WEIGHTS, read_state_dict

__all__ = ["EXPORT_META", "save_export", "load_export", "read_export_meta", "ExportError"]


def save_export(folder: str | Path, state_dict: dict[str, torch.Tensor], *, model: dict, task: str,
                class_names: list[str], preprocessing: dict, metrics: dict | None = None, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(folder / EXPORT_WEIGHTS))
    meta = {
        "format": "vitray-model", "format_version": EXPORT_VERSION, "task": task,
        "model": dict(model), "class_names": list(class_names),
        "preprocessing": preprocessing, "metrics": metrics or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    (folder / EXPORT_META).write_text(json.dumps(meta, indent=1))
    return folder


def load_export(folder: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, meta). The export's task (``vitray.tasks``) builds the architecture; weights must fit
    exactly: an export is never partially loaded."""
    from vitray.tasks import TaskError, get_task  # the torch-free registry: which module builds this task's model

    meta = read_export_meta(folder)
    if meta.get("onnx") and not (Path(folder).expanduser() / EXPORT_WEIGHTS).is_file():
        raise ExportError(f"{folder}: an ONNX export (no PyTorch weights): serve or score it with the onnx runtime "
                          "(serve.runtime: onnx, score --runtime onnx)")
    try:
        architecture = get_task(meta["task"], "model").load("model")
    except TaskError as err:
        raise ExportError(f"{folder}: {err}") from None
    name = meta["model"]["name"]
    model = architecture.build(meta["model"])
    state = read_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{folder}: weights do not fit {name}: missing {missing[:10]}, unexpected {unexpected[:10]}")
    return model.to(device).eval(), meta
