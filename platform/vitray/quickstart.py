"""``vitray quickstart``: the whole product on the embedded defaults, on a laptop, in minutes.

Each stage prints what it did and where its output went; the closing summary lists them all.
Stages run in data-flow order; each later subsystem adds its stage here.
"""
from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from vitray.config import dump_config, load_config, vitray_home

__all__ = ["run_quickstart", "quickstart_config_path"]


def quickstart_config_path() -> Path:
    return Path(str(resources.files("vitray") / "configs" / "quickstart.yaml"))


def _stage(n: int, title: str) -> float:
    print(f"\n[{n}] {title}", flush=True)
    return time.perf_counter()


def run_quickstart(home: str | None = None, overrides: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    root = (Path(home).expanduser() if home else vitray_home()) / "quickstart"
    root.mkdir(parents=True, exist_ok=True)
    summary: list[tuple[str, str]] = []

    t = _stage(1, "config: embedded defaults, resolved")
    cfg = load_config(quickstart_config_path(), overrides)
    from vitray.config import check_config

    check_config(cfg)
    cfg_path = root / "config.yaml"
    dump_config(cfg, cfg_path)
    print(f"    resolved config -> {cfg_path} ({time.perf_counter() - t:.1f}s)")
    summary.append(("resolved config", str(cfg_path)))

    t = _stage(2, f"model: {cfg.model.name}")
    import torch

    from vitray.models import create_model_from_config, model_info

    model = create_model_from_config(cfg.model).eval()
    info = model_info(cfg.model.name, cfg.model.img_size)
    print(f"    {info.params / 1e6:.2f}M parameters, {info.gflops:.2f} GFLOPs/image at {info.img_size}px, "
          f"pos_embed={cfg.model.pos_embed} ({time.perf_counter() - t:.1f}s)")

    t = _stage(3, "forward pass on scikit-learn's bundled digits (untrained model)")
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images[:256]).float().div(16.0)  # (N, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x[:, None], size=info.img_size, mode="bilinear").expand(-1, 3, -1, -1)
    x = (x - 0.5) / 0.5
    with torch.inference_mode():
        logits = model(x)
    top1 = (logits.argmax(1).numpy() == digits.target[:256]).mean()
    print(f"    logits {tuple(logits.shape)}, untrained top-1 {top1:.3f} (chance 0.1) ({time.perf_counter() - t:.1f}s)")

    print(f"\nquickstart done in {time.perf_counter() - t_start:.1f}s")
    for what, where in summary:
        print(f"  {what:<18} {where}")
    return 0
