"""Serving throughput and latency: batching on against batching off, in one run, over real HTTP.

    python benchmarks/serve_throughput.py                         # ViT-Tiny/16 at 224, the defaults below
    python benchmarks/serve_throughput.py --seconds 10 --batch 32
    python benchmarks/serve_throughput.py --accuracy-only \\
        --accuracy-export ~/.vitray/quickstart/runs/RUN/export --accuracy-shards ~/.vitray/quickstart/shards
                                                                  # fp32 vs bf16 on a trained model (after quickstart)

A ViT-Tiny/16 (random weights: timing does not depend on them; nothing is downloaded) is exported and served by
the real application (`vitray.serve.app.deploy`: Serve proxy -> FastAPI ingress with the batched model inside,
the layout for one model) on a local Ray instance, one replica using every core. Clients are asyncio HTTP clients in this process, each
sending 256x256 JPEGs back to back; for concurrency 1, 8 and 32 the table has requests/s and p50/p99 latency.
Rows:
  batching on   @serve.batch max_batch_size=--batch (default 32), batch_wait_timeout_s=--wait (default 0.05)
  batching off  max_batch_size=1 (the same code path, one image per forward)
and at concurrency 32 only: the routed layout (a router ingress + a model deployment, as with several models)
decoding in the model replica or in the ingress, and the other precision (fp32 when the default picked bf16), with
the agreement of the two precisions' predictions. Every mode has max_ongoing_requests 64, so
batching is the only difference between the first two rows.
Goals (issue #6): batching on >= 2x the requests/s of batching off at concurrency 32; p99 <= 3x p50 at
concurrency 8 with batching on.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_export(folder: Path, arch: str) -> Path:
    import torch

    from vitray.models import create_model
    from vitray.models.export import save_export

    torch.manual_seed(0)
    model = create_model(arch, num_classes=1000)
    size = model.default_cfg["input_size"][-1]
    return save_export(folder, model.state_dict(),
                       model={"name": arch, "num_classes": 1000, "img_size": size, "in_chans": 3},
                       task="classification", class_names=[f"class_{i}" for i in range(1000)],
                       preprocessing={"img_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                      "crop_pct": 0.875, "interpolation": "bicubic"})


def images(n: int) -> list[bytes]:
    from imagegen import encode, rgb

    return [encode(rgb(i, size=(256, 256)), "JPEG", quality=90) for i in range(n)]


async def load(url: str, data: list[bytes], concurrency: int, seconds: float) -> dict:
    import aiohttp

    lat: list[float] = []
    sizes: list[int] = []
    failures = 0
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client(k: int):
            nonlocal failures
            i = k
            while time.perf_counter() < deadline:
                t = time.perf_counter()
                async with session.post(url, data=data[i % len(data)], headers={"content-type": "image/jpeg"}) as r:
                    await r.read()
                    if r.status != 200:
                        failures += 1
                    sizes.append(int(r.headers.get("x-vitray-batch-size", 0)))
                lat.append(time.perf_counter() - t)
                i += concurrency
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {"rps": len(lat) / wall, "p50": q[49] * 1000, "p99": q[98] * 1000, "n": len(lat), "failures": failures,
            "mean_batch": statistics.mean(sizes) if sizes else 0.0}


def precision_check(export: str, shards: str) -> None:
    """A trained export on the val split of its shards in fp32 and bf16: top-1 of each, how often they agree, and
    the largest probability difference."""
    import numpy as np
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest
    from vitray.predict import Predictor

    images, labels = [], []
    for f in Manifest.read(shards).files(shards, "val"):
        t = pq.read_table(f, columns=["image", "label"])
        images += t.column("image").to_pylist()
        labels += t.column("label").to_pylist()
    probs = {prec: Predictor.from_export(export, precision=prec).probabilities(images) for prec in ("fp32", "bf16")}
    for prec, p in probs.items():
        print(f"[bench] trained model {prec}: val top-1 {float((p.argmax(1) == np.asarray(labels)).mean()):.4f} "
              f"on {len(labels)} images")
    same = float((probs["fp32"].argmax(1) == probs["bf16"].argmax(1)).mean())
    print(f"[bench] trained model fp32 vs bf16: same top-1 class on {same:.3f} of the images, "
          f"max |p_fp32 - p_bf16| {abs(probs['fp32'] - probs['bf16']).max():.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--batch", type=int, default=32, help="max_batch_size with batching on")
    ap.add_argument("--wait", type=float, default=0.05, help="batch_wait_timeout_s")
    ap.add_argument("--seconds", type=float, default=8.0, help="load time per cell")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--precision", default="auto", help="the precision of the main rows (auto picks bf16 on AMX)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--accuracy-export", default=None, help="a trained export: top-1 with fp32 and bf16")
    ap.add_argument("--accuracy-shards", default=None, help="packed shards with a val split for --accuracy-export")
    ap.add_argument("--accuracy-only", action="store_true", help="only the fp32/bf16 check of --accuracy-export")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.accuracy_only:
        if not (args.accuracy_export and args.accuracy_shards):
            ap.error("--accuracy-only needs --accuracy-export and --accuracy-shards")
        precision_check(args.accuracy_export, args.accuracy_shards)
        return 0

    import ray

    from vitray.config import parse_config
    from vitray.predict import resolve_precision
    from vitray.serve import app

    root = Path(tempfile.mkdtemp(prefix="vitray-bench-serve-"))
    os.environ["VITRAY_HOME"] = str(root / "home")
    export = make_export(root / "export", args.arch)
    data = images(64)
    url = f"http://127.0.0.1:{args.port}/v1/classify"
    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus + 2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    precision = resolve_precision(args.precision)
    print(f"[bench] {args.arch}, {cpus} CPUs, precision {precision}, {args.seconds:.0f}s per cell", flush=True)

    def serve_cfg(batch: int, decode: str = "replica", prec: str = precision, colocate: bool = True):
        return parse_config({"serve": {
            "port": args.port, "models": [{"name": "vit", "uri": str(export)}], "max_batch_size": batch,
            "batch_wait_timeout_s": args.wait, "max_ongoing_requests": 64, "precision": prec, "decode": decode,
            "colocate": colocate, "cpus_per_replica": cpus, "decode_threads": cpus, "ingress_cpus": 1}})

    def measure(label: str, cfg, concurrency: list[int]) -> dict:
        t = time.time()
        app.deploy(cfg)
        asyncio.run(load(url, data, 4, 2.0))  # warm-up: threads, allocator, JIT paths
        out = {}
        for c in concurrency:
            r = asyncio.run(load(url, data, c, args.seconds))
            out[c] = r
            print(f"[bench] {label:<28} c={c:<3} {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  p99 {r['p99']:7.1f} ms"
                  f"  mean batch {r['mean_batch']:5.1f}  failures {r['failures']}  (deployed in {time.time() - t:.0f}s)",
                  flush=True)
        return out

    table = {
        "batching on": measure(f"batching on (<= {args.batch})", serve_cfg(args.batch), levels),
        "batching off": measure("batching off", serve_cfg(1), levels),
        "routed": measure("batching on, routed", serve_cfg(args.batch, colocate=False), [max(levels)]),
        "routed, decode in ingress": measure("batching on, routed, ingress decode",
                                             serve_cfg(args.batch, "ingress", colocate=False), [max(levels)]),
    }
    other = "fp32" if precision != "fp32" else "bf16"
    table[other] = measure(f"batching on, {other}", serve_cfg(args.batch, prec=other), [max(levels)])

    from ray import serve

    serve.shutdown()
    ray.shutdown()

    # precision: do the two agree? (random weights: the agreement of the argmax and the largest probability change)
    from vitray.predict import Predictor

    p32 = Predictor.from_export(export, precision="fp32").probabilities(data)
    p16 = Predictor.from_export(export, precision="bf16").probabilities(data)
    agree = float((p32.argmax(1) == p16.argmax(1)).mean())
    print(f"\n[bench] fp32 vs bf16 on {len(data)} images: top-1 agreement {agree:.3f}, "
          f"max |p_fp32 - p_bf16| {abs(p32 - p16).max():.2e}")
    if args.accuracy_export and args.accuracy_shards:
        precision_check(args.accuracy_export, args.accuracy_shards)

    print("\n| mode | concurrency | requests/s | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|")
    for mode, rows in table.items():
        for c, r in rows.items():
            print(f"| {mode} | {c} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['mean_batch']:.1f} |")
    top = max(levels)
    on, off = table["batching on"][top], table["batching off"][top]
    mid = table["batching on"].get(8)
    print(f"\nthroughput batching on / off at concurrency {top}: {on['rps'] / off['rps']:.2f}x (goal >= 2)")
    if mid:
        print(f"p99 / p50 with batching at concurrency 8: {mid['p99'] / mid['p50']:.2f} (goal <= 3)")
    routed, ing = table["routed"][top], table["routed, decode in ingress"][top]
    print(f"routed (ingress -> model deployment) / colocated at concurrency {top}: {routed['rps'] / on['rps']:.2f}x "
          "requests/s")
    print(f"routed: decode in the ingress / in the model replica at concurrency {top}: "
          f"{ing['rps'] / routed['rps']:.2f}x requests/s")
    print(f"{other} / {precision} at concurrency {top}: {table[other][top]['rps'] / on['rps']:.2f}x requests/s")
    failures = sum(r["failures"] for rows in table.values() for r in rows.values())
    print(f"failed requests: {failures}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
