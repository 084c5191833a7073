"""Detection recipe check: val mAP of the quickstart detector trained by a plain one-process loop, for the embedded
config and for variants of it (``--set`` overrides), in one run, so the config's choices rest on a measurement.

    python benchmarks/detection_recipe.py                                   # crops [0.8, 1] (the config) vs [0.5, 1]
    python benchmarks/detection_recipe.py --steps 500 --variant "model.num_classes=5"   # any other comparison

Data: the quickstart's scenes (`vitray data compose` of scikit-learn's digits 0, 1, 2 at 64 px, val scenes with
held-out digits; 2,000 scenes, packed from the COCO annotations). Each row: the embedded quickstart-detection config
with the row's overrides, a fresh model (seed 0), torch AdamW at the config's lr with a one-cycle schedule (5%
warmup), grad clipping 1.0, --steps optimizer steps of the config's micro batch drawn from the train split with the
real train transforms (vitray's decode_batch), then the val split evaluated by the task's own metric (COCO mAP with
faster-coco-eval). No Ray, no DeepSpeed: this measures the recipe, not the platform.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def rows_of(manifest, root: str, split: str) -> dict:
    import pyarrow.parquet as pq

    from vitray.data.pipeline import read_columns

    tables = [pq.read_table(f, columns=read_columns("detection", [f])) for f in manifest.files(root, split)]
    return {k: sum((t.column(k).to_pylist() for t in tables), []) for k in tables[0].column_names}


def train_and_evaluate(shards: str, overrides: list[str], steps: int) -> tuple[dict, float]:
    import torch

    from vitray.config import load_config
    from vitray.data.formats import Manifest
    from vitray.data.pipeline import EVAL_MAX_BOXES, decode_batch
    from vitray.quickstart import quickstart_config_path
    from vitray.train.tasks import build_task

    cfg = load_config(quickstart_config_path("detection"), [f"data.path={shards}", *overrides])
    m = Manifest.read(shards)
    task = build_task(cfg, m.class_names)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.lr, total_steps=steps, pct_start=0.05)
    train, val = rows_of(m, shards, "train"), rows_of(m, shards, "val")
    tr = {**cfg.data.train_transforms.model_dump(), "mean": cfg.data.mean}
    size, bs = cfg.model.img_size, cfg.data.batch_size
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        order = rng.permutation(len(train["image"]))
        for i in range(0, len(order) - bs + 1, bs):
            rows = {k: [v[j] for j in order[i:i + bs]] for k, v in train.items()}
            batch = {k: torch.from_numpy(v) for k, v in decode_batch(
                rows, task="detection", train=True, img_size=size, transforms=tr, max_pixels=10**7,
                max_boxes=cfg.data.max_boxes).items()}
            loss = task.training_loss(model, batch, torch.float32)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    seconds = time.perf_counter() - t0
    model.eval()
    metric = task.metric()
    with torch.no_grad():
        for i in range(0, len(val["image"]), 200):
            batch = {k: torch.from_numpy(v) for k, v in decode_batch(
                {k: v[i:i + 200] for k, v in val.items()}, task="detection", train=False, img_size=size,
                transforms={"crop_pct": 1.0}, max_pixels=10**7, max_boxes=EVAL_MAX_BOXES).items()}
            metric.update(task.eval_outputs(model, batch, torch.float32), batch)
    metric.sync(lambda t: t, lambda obj: [obj])
    return metric.compute(), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--variant", action="append", default=None, metavar="KEY=VALUE[;KEY=VALUE]",
                    help="a row of overrides (default: data.train_transforms.scale=[0.5,1.0])")
    args = ap.parse_args()

    import torch

    from vitray.data.compose import compose
    from vitray.data.pack import pack

    root = Path(tempfile.mkdtemp(prefix="vitray-recipe-det-"))
    compose("-", str(root / "scenes"), source="sklearn-digits", classes="0,1,2", n=args.scenes, size=64,
            held_out_items=True)
    pack(str(root / "scenes" / "annotations.json"), str(root / "shards"), "coco", images=str(root / "scenes" / "images"),
         val_fraction=0.2, progress=False)
    variants = args.variant or ["data.train_transforms.scale=[0.5,1.0]"]
    print(f"{args.scenes} scenes, {args.steps} steps per row, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads", flush=True)
    results = []
    for label, overrides in [("embedded quickstart-detection config (baseline)", [])] + \
            [(v, [o for o in v.split(";") if o]) for v in variants]:
        metrics, seconds = train_and_evaluate(str(root / "shards"), overrides, args.steps)
        results.append((label, metrics, seconds))
        print(f"[recipe] {label}: val mAP {metrics['val/map']:.3f} AP50 {metrics['val/map50']:.3f} "
              f"({seconds:.0f}s)", flush=True)
    base = results[0][1]["val/map"]
    print("\n| configuration | val mAP | AP50 | AP75 | train s | vs baseline |\n|---|---|---|---|---|---|")
    for label, m, s in results:
        print(f"| {label} | {m['val/map']:.3f} | {m['val/map50']:.3f} | {m['val/map75']:.3f} | {s:.0f} | "
              f"{m['val/map'] - base:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
