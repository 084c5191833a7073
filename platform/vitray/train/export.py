"""End of training: gather consolidated fp32 weights from the DeepSpeed engine and write the export folder."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from vitray import storage
from vitray.config import dump_config
from vitray.models.export import save_export

__all__ = ["gather_fp32_state_dict", "write_export", "preprocessing_of"]


def gather_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """fp32 master weights for every parameter, whatever the ZeRO stage and precision. A collective under ZeRO-3:
    every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None:
            if hasattr(p, "ds_id"):  # ZeRO-3 partitioned parameter outside the optimizer (e.g. fixed sincos)
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    full = p.data.float().cpu().clone()
            else:
                full = p.detach().float()
        state[name] = full.detach().float().cpu().clone()
    for name, b in module.named_buffers():
        if name.rsplit(".", 1)[-1] not in getattr(module, "_non_persistent_buffers_set", set()):
            state[name] = b.detach().cpu().clone()
    return state


def preprocessing_of(cfg, img_size: int) -> dict:
    return {"img_size": img_size, "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "crop_pct": cfg.data.eval_transforms.crop_pct, "interpolation": cfg.data.interpolation}


def write_export(export_dir: str, state: dict, cfg, class_names: list[str], metrics: dict,
                 extra: dict | None = None) -> str:
    """Write locally, then copy to the run storage (a local path or any pyarrow filesystem URI, e.g. s3://)."""
    from vitray.models.zoo import default_img_size
    from vitray.tasks import get_task

    img_size = cfg.model.img_size or default_img_size(cfg.model.name)
    architecture = get_task(cfg.train.task, "model").load("model")
    model = architecture.arch(cfg, img_size)
    if hasattr(architecture, "export_state"):  # trained with more than it exports (MAE's decoder)
        state = architecture.export_state(state)
    with tempfile.TemporaryDirectory(prefix="vitray-export-") as tmp:
        save_export(tmp, state, model=model, task=cfg.train.task, class_names=class_names,
                    preprocessing=preprocessing_of(cfg, img_size), metrics=metrics, extra=extra)
        dump_config(cfg, Path(tmp) / "config.yaml")
        storage.upload_dir(tmp, export_dir)
    return export_dir
