"""Segmentation throughput: training images/s of vitray (Ray Data -> Ray Train -> DeepSpeed) against a plain
single-process torch loop, and serving masks/s of the real Serve application with batching on against off, in one run.

    python benchmarks/segmentation_throughput.py                       # the quickstart-segmentation setup, this CPU
    python benchmarks/segmentation_throughput.py --decoder linear      # the linear decoder instead of PUP
    python benchmarks/segmentation_throughput.py --scenes 800 --steps 30 --requests 160 --clients 8   # a quick look

The data are the quickstart's: scenes of 32 px composed from scikit-learn's bundled digits 0, 1 and 2 (exact masks),
packed as a mask folder (80/20 train/val). The model and its training settings are the embedded
quickstart-segmentation config (ViT-pico patch 4 + the --decoder, micro batch 32, AdamW, DeepSpeed ZeRO-2, fp32)
with data.path, cluster.storage_path, tracking.enabled=false, train.steps and cluster.num_workers overridden.

Training rows: the plain loop (baseline: ARCHITECTURE.for_training(cfg), the same micro batch, torch AdamW from
vitray.train.optim.build_optimizer, per-pixel cross-entropy with ignore_index 255, on tensors already in memory,
torch using every core); vitray 1 worker (the worker gets all cores, like the baseline) against the baseline;
vitray 2 workers against 1 worker. vitray's figure is its steady-state images/s from <run>/metrics.jsonl (optimizer
steps x global batch / wall time between log lines, after the first window), which includes waiting for data, Ray,
DeepSpeed (ZeRO-2 partitioning, the config's grad clipping) and the lr schedule; each run's total wall time is
printed too. Goal: vitray 1 worker >= 0.85x the plain loop on this CPU.

Serving rows: the export the 1-worker run wrote, served by the real application (`vitray.serve.app.deploy`: Serve
proxy -> FastAPI ingress with the batched model inside, one replica using every core) on 127.0.0.1; --clients
threads (one requests.Session each) POST the val scenes' PNGs to /v1/segment back to back, --requests in all per
mode, after a warm-up. Every answer must be 200 with a mask the size of its image.
  batching on   serve.max_batch_size 16, batch_wait_timeout_s 0.01
  batching off  serve.max_batch_size 1 (the same code path, one image per forward)
Both modes have the same max_ongoing_requests, so batching is the only difference; Serve is shut down and the
application deployed again between the two. The ratio column of the batching-off row is on / off.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

IGNORE = 255


def make_shards(root: Path, n: int) -> str:
    from vitray.data.compose import compose
    from vitray.data.pack import pack

    compose("-", str(root / "scenes"), source="sklearn-digits", classes="0,1,2", n=n, size=32, overwrite=True)
    pack(str(root / "scenes"), str(root / "shards"), "masks", val_fraction=0.2, overwrite=True, progress=False)
    return str(root / "shards")


def config(shards: str, storage: str, steps: int, workers: int, cpus_per_worker: float, decoder: str, name: str):
    from vitray.config import load_config
    from vitray.quickstart import quickstart_config_path

    return load_config(quickstart_config_path("segmentation"), [
        f"data.path={shards}", f"cluster.storage_path={storage}", "tracking.enabled=false", f"train.steps={steps}",
        f"cluster.num_workers={workers}", f"cluster.cpus_per_worker={cpus_per_worker}", f"cluster.run_name={name}",
        "train.log_every_steps=5", f"segmentation.decoder={decoder}"])


def plain_loop(cfg, steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F

    from vitray.tasks.segmentation.model import ARCHITECTURE
    from vitray.train.optim import build_optimizer

    torch.manual_seed(0)
    model = ARCHITECTURE.for_training(cfg)
    model.train()
    size, batch, classes = cfg.model.img_size, cfg.data.batch_size, cfg.model.num_classes
    opt = build_optimizer(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, classes, (batch, size, size))
    y[:, :2] = IGNORE  # a few ignored pixels, as crops at the border give
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).float(), y, ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - t0)


def vitray_run(cfg):
    from vitray.train import run_training

    res = run_training(cfg)
    log = [json.loads(line) for line in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/images_per_s"] for r in log if "train/images_per_s" in r][1:]  # drop the warmup window
    return float(np.median(rates)), res


def train_rows(config_of, base: float, cores: int, what: str = "") -> tuple[list, tuple, tuple]:
    """The two vitray training rows against the plain loop's ``base`` img/s: 1 worker with every core, then 2 workers
    with half each; ``config_of(workers, cpus_per_worker, run_name)`` makes each run's config. Returns (rows,
    (1-worker img/s, result), (2-worker img/s, result))."""
    half = max(1, cores // 2)
    one, res1 = vitray_run(config_of(1, cores, "w1"))
    rows = [("train", f"vitray, 1 worker x {cores} CPUs, ZeRO-2, Ray Data from shards", one, res1.seconds, one / base)]
    print(rows[-1], what and f"{what} {res1.metrics.get(what, float('nan')):.3f}", flush=True)
    two, res2 = vitray_run(config_of(2, half, "w2"))
    rows.append(("train", f"vitray, 2 workers x {half} CPUs, ZeRO-2 (vs the plain loop; {two / one:.2f}x 1 worker)",
                 two, res2.seconds, two / base))
    print(rows[-1], flush=True)
    return rows, (one, res1), (two, res2)


def val_images(shards: str, n: int) -> list[tuple[bytes, int, int]]:
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

    out = []
    for f in Manifest.read(shards).files(shards, "val"):
        t = pq.read_table(f, columns=["image", "width", "height"])
        out += zip(t.column("image").to_pylist(), t.column("width").to_pylist(), t.column("height").to_pylist())
        if len(out) >= n:
            break
    return out[:n]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_mask(body: dict, w: int, h: int) -> str | None:
    """Why a /v1/segment answer is wrong for a w x h image, or None."""
    from PIL import Image

    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
    if mask.shape != (h, w) or (body["image"]["width"], body["image"]["height"]) != (w, h):
        return f"mask {mask.shape} / image {body['image']} for a {w}x{h} image"
    return None


def load(url: str, data: list[tuple[bytes, int, int]], clients: int, requests_total: int, check=check_mask) -> dict:
    """``requests_total`` POSTs from ``clients`` threads (one requests.Session each), back to back; each answer
    checked: 200, and ``check(body, width, height)`` (the answer fits its image)."""
    import requests

    lat: list[float] = []
    sizes: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        mine = range(k, requests_total, clients)
        with requests.Session() as s:
            for i in mine:
                img, w, h = data[i % len(data)]
                t = time.perf_counter()
                r = s.post(url, data=img, headers={"content-type": "image/png"}, timeout=120)
                dt = time.perf_counter() - t
                why = None
                if r.status_code != 200:
                    why = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    why = check(r.json(), w, h)
                with lock:
                    lat.append(dt)
                    sizes.append(int(r.headers.get("x-vitray-batch-size", 0)))
                    if why:
                        failures.append(why)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {"rate": len(lat) / wall, "p50": q[49] * 1000, "p99": q[98] * 1000, "n": len(lat), "failures": failures,
            "mean_batch": statistics.mean(sizes) if sizes else 0.0, "wall": wall}


def serve_mode(export: str, data, batch: int, ongoing: int, clients: int, requests_total: int, cpus: int,
               route: str = "/v1/segment", check=check_mask) -> dict:
    import requests
    from ray import serve

    from vitray.config import parse_config
    from vitray.serve import app

    port = free_port()
    cfg = parse_config({"tracking": {"enabled": False}, "serve": {
        "host": "127.0.0.1", "port": port, "models": [{"name": "seg", "uri": export}], "max_batch_size": batch,
        "batch_wait_timeout_s": 0.01, "max_ongoing_requests": ongoing, "cpus_per_replica": cpus}})
    url = f"http://127.0.0.1:{port}{route}"
    t = time.perf_counter()
    app.deploy(cfg)
    try:
        deployed = time.perf_counter() - t
        precision = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=60).json()["models"][0]["precision"]
        load(url, data, clients, max(2 * clients, requests_total // 10), check)  # warm-up: threads, connections
        out = load(url, data, clients, requests_total, check)
    finally:
        serve.shutdown()
    out.update(precision=precision, deployed=deployed)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=2000, help="composed scenes (20%% val)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per training row")
    ap.add_argument("--decoder", choices=("pup", "linear"), default="pup")
    ap.add_argument("--requests", type=int, default=400, help="POSTs per serving mode")
    ap.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    ap.add_argument("--batch", type=int, default=16, help="serve.max_batch_size with batching on")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import ray
    import torch

    from vitray.train.trainer import init_ray

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="vitray-bench-seg-"))
    os.environ["VITRAY_HOME"] = str(work / "home")
    storage = str(work / "runs")
    shards = make_shards(work, args.scenes)
    base_cfg = config(shards, storage, args.steps, 1, cores, args.decoder, "plain")
    torch.set_num_threads(cores)
    print(f"machine: {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), ray {ray.__version__}; "
          f"{base_cfg.model.name} + {args.decoder} decoder, {base_cfg.model.img_size} px, micro batch "
          f"{base_cfg.data.batch_size}, fp32, AdamW; {args.scenes} composed scenes in shards", flush=True)

    base = plain_loop(base_cfg, args.steps, warmup=3)
    print(f"plain torch loop: {base:.1f} img/s", flush=True)
    rows = [("train", f"plain torch loop, {args.decoder} decoder, tensors in memory (baseline)", base, None, 1.0)]

    init_ray(None, cores + max(2, cores // 2))  # once: trainers + Ray Data's decode tasks, then the Serve replica
    try:
        more, (one, res1), (two, _) = train_rows(
            lambda w, c, name: config(shards, storage, args.steps, w, c, args.decoder, name), base, cores, "val/miou")
        rows += more

        data = val_images(shards, 256)
        ongoing = max(2 * args.batch, args.clients)
        modes = {}
        for label, batch in ((f"batching on (<= {args.batch}, wait 10 ms)", args.batch), ("batching off", 1)):
            r = serve_mode(res1.export_dir, data, batch, ongoing, args.clients, args.requests, cores)
            modes[label] = r
            print(f"[bench] {label:<30} {r['rate']:7.1f} masks/s  p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms  "
                  f"mean batch {r['mean_batch']:4.1f}  failures {len(r['failures'])}  {r['precision']}  "
                  f"(deployed in {r['deployed']:.0f}s)", flush=True)
    finally:
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    (on_label, on), (off_label, off) = modes.items()
    rows.append(("serve", f"{on_label}, {args.clients} clients, {on['precision']}", on['rate'], on["wall"], 1.0))
    rows.append(("serve", f"{off_label}, {args.clients} clients, {off['precision']} (on / off)", off['rate'],
                 off["wall"], on["rate"] / off["rate"]))
    print("\n| configuration | images/s (train) or masks/s (serve) | wall s | ratio |")
    print("|---|---|---|---|")
    for _, name, rate, wall, ratio in rows:
        print(f"| {name} | {rate:,.1f} | {'' if wall is None else f'{wall:.0f}'} | {ratio:.2f}x |")
    print(f"\ndecoder: {args.decoder}; vitray / plain loop: 1 worker {one / base:.2f}x, 2 workers {two / base:.2f}x "
          f"(goal >= 0.85); "
          f"serving batching on / off: {on['rate'] / off['rate']:.2f}x at {args.clients} clients "
          f"(mean batch {on['mean_batch']:.1f})")
    failures = on["failures"] + off["failures"]
    for why in failures[:5]:
        print(f"failed request: {why}")
    print(f"failed requests: {len(failures)}; total wall time {time.perf_counter() - t_start:.0f}s")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
