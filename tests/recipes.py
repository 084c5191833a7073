"""The training recipe the tests share (the quickstart's, shortened where a test allows) and helpers around it."""
from __future__ import annotations

import json
from pathlib import Path

from vitray.config import parse_config

RECIPE = {  # the quickstart recipe (platform/vitray/configs/quickstart.yaml) before it took avg pooling + clipping
    "model": {"name": "vit_pico_patch4_32", "num_classes": 10, "pos_embed": "sincos"},
    "data": {"batch_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
             "train_transforms": {"scale": [0.6, 1.0], "hflip": 0.0}, "eval_transforms": {"crop_pct": 1.0}},
    "train": {"epochs": 25, "lr": 6e-3, "warmup_epochs": 2, "label_smoothing": 0.1, "log_every_steps": 50},
    "tracking": {"enabled": False},  # tracking has its own tests (test_tracking.py)
    "deepspeed": {"zero_stage": 2},
    "cluster": {"num_workers": 2},
}
DETERMINISTIC = {"shuffle": False, "train_transforms": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0}}


def merge(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_cfg(digits: str, tmp_path: Path, **over):
    cfg = merge(RECIPE, {"data": {"path": digits}, "cluster": {"storage_path": str(tmp_path / "runs")}})
    return parse_config(merge(cfg, over))


def read_log(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
