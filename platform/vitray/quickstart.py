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

    t = _stage(2, "data: pack scikit-learn's bundled digits into shards")
    from vitray.data.pack import pack

    shards = root / "shards"
    manifest = pack("-", str(shards), "sklearn-digits", val_fraction=0.1, overwrite=True, progress=False)
    cfg.data.path = str(shards)
    dump_config(cfg, cfg_path)
    print(f"    {sum(manifest.counts.values()):,} images ({', '.join(f'{k} {v}' for k, v in manifest.counts.items())}) "
          f"in {len(manifest.shards)} shards -> {shards} ({time.perf_counter() - t:.1f}s)")
    summary.append(("shards", str(shards)))

    t = _stage(3, f"model: {cfg.model.name}")
    import torch

    from vitray.models import create_model_from_config, model_info

    model = create_model_from_config(cfg.model).eval()
    info = model_info(cfg.model.name, cfg.model.img_size)
    print(f"    {info.params / 1e6:.2f}M parameters, {info.gflops:.2f} GFLOPs/image at {info.img_size}px, "
          f"pos_embed={cfg.model.pos_embed} ({time.perf_counter() - t:.1f}s)")

    t = _stage(4, "stream the val split through Ray Data (decode + eval transform on CPU tasks) into the model")
    import ray

    from vitray.data.pipeline import build_dataset, dataset_spec
    from vitray.data.transforms import normalize_batch

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    try:
        spec = dataset_spec(cfg.data)
        ds = build_dataset(spec, cfg.data.val_split, cfg.data, img_size=info.img_size, train=False)
        correct = seen = 0
        with torch.inference_mode():
            for batch in ds.iter_torch_batches(batch_size=cfg.data.batch_size):
                logits = model(normalize_batch(batch["image"], cfg.data.mean, cfg.data.std))
                correct += int((logits.argmax(1) == batch["label"]).sum())
                seen += len(logits)
    finally:
        if started_ray:
            ray.shutdown()
    print(f"    {seen} val images streamed; untrained top-1 {correct / seen:.3f} (chance 0.1) "
          f"({time.perf_counter() - t:.1f}s)")

    print(f"\nquickstart done in {time.perf_counter() - t_start:.1f}s")
    for what, where in summary:
        print(f"  {what:<18} {where}")
    return 0
