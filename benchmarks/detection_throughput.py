"""Detection throughput, in one run: training images/s of vitray (Ray Data -> Ray Train -> DeepSpeed) against a
plain single-process torch loop; serving images/s of the real Serve application with batching on against off; and
`vitray score` images/s against a plain single-process scoring loop.

    python benchmarks/detection_throughput.py                       # the quickstart-detection setup, this CPU
    python benchmarks/detection_throughput.py --scenes 800 --steps 30 --requests 160 --score-images 2048   # a look

Data: the quickstart's: 64 px scenes composed from scikit-learn's bundled digits 0, 1 and 2 (val scenes with held-out
digits), packed from the COCO annotations. Model and training settings: the embedded quickstart-detection config
(ViT-pico patch 8, ViTDet simple pyramid + CenterNet head, micro batch 32, AdamW, ZeRO-2, fp32) with data.path,
cluster.storage_path, tracking.enabled=false, train.steps and cluster.num_workers overridden.

Training rows: the plain loop (baseline: ARCHITECTURE.for_training(cfg), the same micro batch, torch AdamW from
vitray.train.optim.build_optimizer, CenterNet's loss on real decoded scenes already in memory as tensors, torch
using every core); vitray 1 worker (all cores) and 2 workers against it. vitray's figure is its steady-state
images/s from <run>/metrics.jsonl (after the first window): waiting for data, Ray, DeepSpeed ZeRO-2, the grad
clipping and the lr schedule included. Goal: vitray 1 worker >= 0.85x the plain loop.

Serving rows: the 1-worker run's export behind the real application (Serve proxy -> FastAPI ingress -> batched model,
one replica with every core) on 127.0.0.1; --clients threads POST val scenes to /v1/detect back to back; every answer
must be 200 for an image of its size. Batching on: serve.max_batch_size --batch, wait 10 ms; off: max_batch_size 1
(the same code path). Same max_ongoing_requests in both; Serve is redeployed between them.

Scoring rows: --score-images scenes (the packed images repeated) in Parquet files of 1,024 rows; the plain loop reads
each file, decodes and prepares each image with vitray's own preprocessing (one process, torch on every core), runs
batches of --score-batch through the export and decodes the boxes (the task's postprocess); `vitray score` does the
same on Ray Data (decode tasks + one predictor actor with --score-cpus, default every core) and writes Parquet; its
figure is the job's own (pipeline start included). Both in the same precision (auto: bf16 on a CPU with AMX). Goal:
vitray score >= 0.9x the plain loop. --score-cpus 1 gives vitray score's default of one CPU per actor, where the
64 px detector is compute-bound on that one core.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from segmentation_throughput import serve_mode, train_rows, val_images  # noqa: E402


def make_shards(root: Path, n: int) -> str:
    from vitray.data.compose import compose
    from vitray.data.pack import pack

    compose("-", str(root / "scenes"), source="sklearn-digits", classes="0,1,2", n=n, size=64, held_out_items=True,
            overwrite=True)
    pack(str(root / "scenes" / "annotations.json"), str(root / "shards"), "coco", task="detection",
         images=str(root / "scenes" / "images"), val_fraction=0.2, overwrite=True, progress=False)
    return str(root / "shards")


def config(shards: str, storage: str, steps: int, workers: int, cpus_per_worker: float, name: str):
    from vitray.config import load_config
    from vitray.quickstart import quickstart_config_path

    return load_config(quickstart_config_path("detection"), [
        f"data.path={shards}", f"cluster.storage_path={storage}", "tracking.enabled=false", f"train.steps={steps}",
        f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={cpus_per_worker}", f"cluster.run_name={name}",
        "train.log_every_steps=5"])


def plain_loop(cfg, steps: int, warmup: int) -> float:
    import pyarrow.parquet as pq
    import torch

    from vitray.data.formats import Manifest
    from vitray.data.pipeline import decode_batch, read_columns
    from vitray.models.centernet import centernet_loss
    from vitray.tasks.detection.model import ARCHITECTURE
    from vitray.train.optim import build_optimizer
    from vitray.train.tasks import build_task

    torch.manual_seed(0)
    m = Manifest.read(cfg.data.path)
    table = pq.read_table(m.files(cfg.data.path, "train")[0], columns=read_columns("detection"))
    rows = {k: table.column(k).to_pylist()[:cfg.data.batch_size] for k in table.column_names}
    tr = {**cfg.data.train_transforms.model_dump(), "mean": cfg.data.mean}
    batch = {k: torch.from_numpy(v) for k, v in decode_batch(rows, task="detection", train=True,
                                                               img_size=cfg.model.img_size, transforms=tr,
                                                               max_pixels=10**7, max_boxes=cfg.data.max_boxes).items()}
    x = build_task(cfg, m.class_names).inputs(batch, torch.float32)
    stride = build_task(cfg, m.class_names).stride
    model = ARCHITECTURE.for_training(cfg)
    model.train()
    opt = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss, _ = centernet_loss(model(x).float(), batch["boxes"], batch["box_labels"], stride, batch["box_crowd"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * len(x) / (time.perf_counter() - t0)


def check_boxes(body: dict, w: int, h: int) -> str | None:
    if (body["image"]["width"], body["image"]["height"]) != (w, h):
        return f"image {body['image']} for a {w}x{h} image"
    bad = [d for d in body["detections"] if not (0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= w
                                                 and 0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= h)]
    return f"{len(bad)} boxes outside a {w}x{h} image" if bad else None


def write_score_inputs(shards: str, root: Path, n: int, per_file: int = 1024) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

    m = Manifest.read(shards)
    images = [b for s in m.splits for f in m.files(shards, s) for b in pq.read_table(f, columns=["image"])
              .column("image").to_pylist()]
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, n, per_file):
        k = min(n, start + per_file) - start
        table = pa.table({"id": [f"img-{i:07d}" for i in range(start, start + k)],
                          "image": [images[i % len(images)] for i in range(start, start + k)]})
        files.append(root / f"part-{start // per_file:04d}.parquet")
        pq.write_table(table, files[-1])
    return files


def plain_score(files: list[Path], export: str, precision: str, batch_size: int) -> tuple[int, float]:
    import pyarrow.parquet as pq
    import torch

    from vitray.predict import Predictor

    torch.set_num_threads(os.cpu_count() or 1)
    predictor = Predictor.from_export(export, precision=precision)
    n = 0
    t = time.perf_counter()
    for f in files:
        images = pq.read_table(f, columns=["image"]).column("image").to_pylist()
        for i in range(0, len(images), batch_size):
            n += len(predictor.predict(images[i:i + batch_size]))
    return n, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=2000, help="composed scenes (20%% val)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per training row")
    ap.add_argument("--requests", type=int, default=400, help="POSTs per serving mode")
    ap.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    ap.add_argument("--batch", type=int, default=16, help="serve.max_batch_size with batching on")
    ap.add_argument("--score-images", type=int, default=16384, help="images scored per scoring row")
    ap.add_argument("--score-batch", type=int, default=256, help="batch of both scoring rows")
    ap.add_argument("--score-cpus", type=float, default=None,
                    help="vitray score --cpus-per-actor (default: every core, as the plain loop's torch threads)")
    ap.add_argument("--precision", default="auto", help="serving and scoring precision")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import ray
    import torch

    from vitray.batch import score
    from vitray.config import TrackingConfig
    from vitray.predict import resolve_precision
    from vitray.train.trainer import init_ray

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="vitray-bench-det-"))
    os.environ["VITRAY_HOME"] = str(work / "home")
    storage = str(work / "runs")
    shards = make_shards(work, args.scenes)
    base_cfg = config(shards, storage, args.steps, 1, cores, "plain")
    torch.set_num_threads(cores)
    precision = resolve_precision(args.precision)
    print(f"machine: {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), ray {ray.__version__}; "
          f"{base_cfg.model.name} + simple pyramid + CenterNet, {base_cfg.model.img_size} px, micro batch "
          f"{base_cfg.data.batch_size}, fp32 training, AdamW; {args.scenes} composed scenes in shards", flush=True)

    base = plain_loop(base_cfg, args.steps, warmup=3)
    print(f"plain torch loop: {base:.1f} img/s", flush=True)
    rows = [("train", "plain torch loop, decoded scenes in memory (baseline)", base, None, 1.0)]

    init_ray(None, cores + max(2, cores // 2))  # once: trainers + Ray Data's decode tasks, then Serve, then scoring
    try:
        more, (one, res1), (two, _) = train_rows(
            lambda w, c, name: config(shards, storage, args.steps, w, c, name), base, cores, "val/map")
        rows += more

        data = val_images(shards, 256)
        ongoing = max(2 * args.batch, args.clients)
        modes = {}
        for label, batch in ((f"batching on (<= {args.batch}, wait 10 ms)", args.batch), ("batching off", 1)):
            r = serve_mode(res1.export_dir, data, batch, ongoing, args.clients, args.requests, cores,
                           route="/v1/detect", check=check_boxes)
            modes[label] = r
            print(f"[bench] {label:<30} {r['rate']:7.1f} images/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms  "
                  f"mean batch {r['mean_batch']:4.1f}  failures {len(r['failures'])}  {r['precision']}", flush=True)
        from ray import serve

        serve.shutdown()

        files = write_score_inputs(shards, work / "score-input", args.score_images)
        plain_score(files[:1], res1.export_dir, precision, args.score_batch)  # warm-up: page cache, allocator
        n, s = plain_score(files, res1.export_dir, precision, args.score_batch)
        plain_rate = n / s
        print(f"[bench] plain scoring loop: {n:,} images in {s:.1f}s = {plain_rate:.1f} img/s ({precision})", flush=True)
        summary = score(res1.export_dir, str(work / "score-input"), str(work / "score-output"),
                        batch_size=args.score_batch, precision=precision, cpus_per_actor=args.score_cpus or cores,
                        tracking_cfg=TrackingConfig(enabled=False))
        print(f"[bench] vitray score: {summary.rows_this_run:,} images in {summary.seconds:.1f}s = "
              f"{summary.images_per_s:.1f} img/s ({summary.error_rows} error rows)", flush=True)
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    (on_label, on), (off_label, off) = modes.items()
    rows.append(("serve", f"{on_label}, {args.clients} clients, {on['precision']}", on["rate"], on["wall"], 1.0))
    rows.append(("serve", f"{off_label}, {args.clients} clients, {off['precision']} (on / off)", off["rate"],
                 off["wall"], on["rate"] / off["rate"]))
    rows.append(("score", f"plain scoring loop, one process, {precision} (baseline)", plain_rate, s, 1.0))
    rows.append(("score", f"vitray score, Ray Data decode tasks + 1 predictor actor x {args.score_cpus or cores:g} "
                          f"CPUs, {precision}", summary.images_per_s,
                 summary.seconds, summary.images_per_s / plain_rate))
    print("\n| configuration | images/s | wall s | ratio |")
    print("|---|---|---|---|")
    for _, name, rate, wall, ratio in rows:
        print(f"| {name} | {rate:,.1f} | {'' if wall is None else f'{wall:.0f}'} | {ratio:.2f}x |")
    print(f"\nvitray / plain loop: training 1 worker {one / base:.2f}x, 2 workers {two / base:.2f}x (goal >= 0.85); "
          f"serving batching on / off {on['rate'] / off['rate']:.2f}x at {args.clients} clients (mean batch "
          f"{on['mean_batch']:.1f}); scoring {summary.images_per_s / plain_rate:.2f}x (goal >= 0.9); "
          f"val mAP of the 1-worker run {res1.metrics.get('val/map', float('nan')):.3f} after {args.steps} steps")
    failures = on["failures"] + off["failures"]
    for why in failures[:5]:
        print(f"failed request: {why}")
    print(f"failed requests: {len(failures)}; total wall time {time.perf_counter() - t_start:.0f}s")
    return 0 if not failures and not summary.error_rows else 1


if __name__ == "__main__":
    sys.exit(main())
