"""Does MAE pretraining pay when labels are few? Pretrain on every training image without labels, then fine-tune on
10% of the labels, against training from scratch on the same 10% for the same steps; and a linear probe.

    python benchmarks/mae_low_label.py                        # the README's table (about 30 min on 2 cores: 17 of them pretraining)
    python benchmarks/mae_low_label.py --pretrain-epochs 20 --steps 100 --seeds 1   # a quick look

Data: scikit-learn's bundled digits (1,797 real 8x8 scans, shipped inside the package), packed by `vitray data pack
--format sklearn-digits` (train 1,602 / val 195 by the packer's stable hash). The labelled set: a seeded, class-
stratified 10% of the train split, written as an image folder (train/CLASS/IMAGE, val/CLASS/IMAGE: the whole val
split) and packed with `vitray data pack --format imagefolder`. Each labelled image is written --repeat times (ids
differ, pixels do not): an epoch then holds enough steps that per-epoch work (evaluation, checkpoint) does not
dominate 160 images; every copy gets its own random crop, as any epoch would.

Every run is a real `vitray train` run in this process (Ray Train workers, DeepSpeed ZeRO-2, the task registry), on
one local Ray cluster, MLflow tracking off:

1. pretrain: `jobs/configs/mae_digits_vit_pico.yaml` (task mae) on the full train split, labels ignored;
2. per seed: from scratch (the classification recipe below, random init) and fine-tuned from the MAE encoder (the
   same recipe with model.checkpoint = the MAE export and layer decay 0.75, as MAE fine-tunes), --steps optimizer
   steps each; the val top-1 of the last epoch;
3. per seed: a linear probe of the MAE encoder (frozen; BatchNorm without affine + linear head, train.linear_probe).

Prints the table (mean and std over seeds) and the pretraining time; the figures in the README come from here.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

FINETUNE = {  # the classification recipe, for scratch and fine-tuning alike (MAE's fine-tuning recipe, scaled)
    "model": {"name": "vit_pico_patch4_32", "num_classes": 10, "pos_embed": "sincos", "global_pool": "avg",
              "drop_path": 0.1},
    "data": {"batch_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "eval_transforms": {"crop_pct": 1.0},
             "train_transforms": {"scale": [0.6, 1.0], "hflip": 0.0}},
    "train": {"lr": 4.0e-3, "lr_base_batch_size": 256, "betas": [0.9, 0.999], "weight_decay": 0.05,
              "label_smoothing": 0.1, "warmup_steps": 20, "min_lr": 1.0e-6, "log_every_steps": 100},
    "deepspeed": {"zero_stage": 2, "grad_clip": 1.0},
    "cluster": {"num_workers": 2},
    "tracking": {"enabled": False},
}
PROBE = {"train": {"lr": 1.0e-2, "weight_decay": 0.0, "label_smoothing": 0.0, "linear_probe": True},
         "model": {"drop_path": 0.0}}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def labelled_subset(shards: str, out: Path, fraction: float, repeat: int, seed: int) -> int:
    """A class-stratified ``fraction`` of the train split (each image ``repeat`` times) and the whole val split, as
    an image folder. Returns the number of distinct labelled train images."""
    import random

    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

    m = Manifest.read(shards)
    rng = random.Random(seed)
    picked = 0
    for split in ("train", "val"):
        rows = [r for f in m.files(shards, split) for r in pq.read_table(f, columns=["id", "image", "label"]).to_pylist()]
        if split == "train":
            by_class: dict[int, list] = {}
            for r in rows:
                by_class.setdefault(r["label"], []).append(r)
            rows = []
            for label in sorted(by_class):
                group = sorted(by_class[label], key=lambda r: r["id"])
                rows += rng.sample(group, max(1, round(fraction * len(group))))
            picked = len(rows)
        for r in rows:
            folder = out / split / m.class_names[r["label"]]
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(repeat if split == "train" else 1):
                (folder / f"{r['id']}-{k}.png").write_bytes(r["image"])
    return picked


def train(cfg_dict: dict, data: str, storage: str, name: str) -> tuple[dict, float, str]:
    from vitray.config import parse_config
    from vitray.train.trainer import run_training

    cfg = parse_config(_merge(cfg_dict, {"data": {"path": data},
                                         "cluster": {"storage_path": storage, "run_name": name}}))
    t0 = time.perf_counter()
    result = run_training(cfg)
    return result.metrics, time.perf_counter() - t0, result.export_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pretrain-epochs", type=int, default=200, help="MAE epochs over the 1,602 train images "
                                                                     "(about 5 s each on 2 cores)")
    ap.add_argument("--steps", type=int, default=300, help="optimizer steps of every fine-tuning / probe run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.1, help="share of the train labels kept")
    ap.add_argument("--repeat", type=int, default=10, help="copies of each labelled image per epoch")
    ap.add_argument("--workdir", default=None, help="keep everything here (default: a temporary folder)")
    args = ap.parse_args()

    import yaml

    import ray
    from vitray.data.pack import pack

    tmp = tempfile.TemporaryDirectory(prefix="vitray-mae-bench-")
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    storage = str(work / "runs")
    shards = str(work / "digits")
    pack("", shards, "sklearn-digits", overwrite=True, progress=False)
    n_labelled = labelled_subset(shards, work / "labelled-images", args.fraction, args.repeat, seed=0)
    labelled = str(work / "labelled")
    pack(str(work / "labelled-images"), labelled, "imagefolder", overwrite=True, progress=False)
    print(f"[bench] {n_labelled} labelled train images ({args.fraction:.0%}, x{args.repeat} per epoch); "
          f"pretraining on all 1,602 train images without labels", flush=True)
    # one local Ray for every run, as `vitray train` starts it (4 logical CPUs on 2 cores), workers' logs not echoed
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        mae_cfg = yaml.safe_load((ROOT / "jobs/configs/mae_digits_vit_pico.yaml").read_text())
        mae_cfg = _merge(mae_cfg, {"train": {"epochs": args.pretrain_epochs}, "tracking": {"enabled": False}})
        pre, pre_s, encoder = train(mae_cfg, shards, storage, "mae-pretrain")
        print(f"[bench] MAE pretraining: {args.pretrain_epochs} epochs in {pre_s / 60:.1f} min, "
              f"val/recon_loss {pre['val/recon_loss']:.4f}", flush=True)
        rows: dict[str, list[float]] = {"scratch": [], "MAE fine-tune": [], "MAE linear probe": []}
        for seed in range(args.seeds):
            base = _merge(FINETUNE, {"train": {"steps": args.steps, "seed": seed}, "data": {"seed": seed}})
            runs = {"scratch": base,
                    "MAE fine-tune": _merge(base, {"model": {"checkpoint": encoder}, "train": {"layer_decay": 0.75}}),
                    "MAE linear probe": _merge(_merge(base, PROBE), {"model": {"checkpoint": encoder}})}
            for what, cfg in runs.items():
                metrics, seconds, _ = train(cfg, labelled, storage, f"{what.replace(' ', '-')}-{seed}")
                rows[what].append(metrics["val/top1"])
                print(f"[bench] seed {seed} {what}: val top-1 {metrics['val/top1']:.4f} ({seconds:.0f} s)", flush=True)
    finally:
        ray.shutdown()
    print(f"\nMAE pretraining: {args.pretrain_epochs} epochs, {pre_s / 60:.1f} min, val/recon_loss "
          f"{pre['val/recon_loss']:.4f}; {n_labelled} labels; {args.steps} steps per run; {args.seeds} seeds")
    print("| run | val top-1 (mean ± std) | seeds |")
    print("|---|---|---|")
    for what, values in rows.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {what} | {statistics.mean(values):.3f} ± {std:.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    gain = statistics.mean(rows["MAE fine-tune"]) - statistics.mean(rows["scratch"])
    print(f"MAE fine-tune - scratch: {gain * 100:+.1f} points (goal: >= +3)")


if __name__ == "__main__":
    main()
