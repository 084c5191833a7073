"""Batch scoring throughput: `vitray score` (Ray Data) against a plain single-process loop, in one run.

    python benchmarks/score_throughput.py                      # 8,192 256x256 JPEGs, ViT-Tiny/16 at 224, 2 actors
    python benchmarks/score_throughput.py --images 20000 --concurrency 2 --batch-size 64

The same Parquet files (id + encoded JPEG, 1,024 rows each) and the same exported ViT-Tiny/16 (random weights:
timing does not depend on them) go through
  plain loop, PIL   read a file, decode with PIL, resize the short side + centre crop, batch, forward (one process)
  plain loop, vitray decode   the same loop with vitray's decode (libjpeg-turbo) and preprocessing
  vitray score      read -> decode/preprocess on Ray Data CPU tasks -> predictor actor(s) -> Parquet parts
all in the same precision (auto: bf16 on a CPU with AMX). Ray is started before the timed part (its ~6 s start is
printed separately: on a cluster it is already up). Goal (issue #7): vitray score >= 0.9x the plain loop here.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def write_inputs(root: Path, n: int, per_file: int = 1024) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imagegen import encode, rgb

    root.mkdir(parents=True, exist_ok=True)
    files = []
    for start in range(0, n, per_file):
        ids = [f"img-{i:07d}" for i in range(start, min(n, start + per_file))]
        images = [encode(rgb(i, size=(256, 256)), "JPEG", quality=90) for i in range(start, start + len(ids))]
        path = root / f"part-{start // per_file:04d}.parquet"
        pq.write_table(pa.table({"id": ids, "image": pa.array(images, pa.binary())}), path)
        files.append(path)
    return files


def plain_loop(files: list[Path], export: Path, precision: str, batch_size: int, use_pil: bool) -> tuple[int, float]:
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from vitray.predict import Predictor, prepare

    torch.set_num_threads(os.cpu_count() or 1)
    predictor = Predictor.from_export(export, precision=precision)
    meta = predictor.meta
    size = predictor.input_size
    resize = int(round(size / meta["preprocessing"]["crop_pct"]))

    def pil(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        s = resize / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)

    n = 0
    t = time.perf_counter()
    for f in files:
        images = pq.read_table(f, columns=["image"]).column("image").to_pylist()
        for i in range(0, len(images), batch_size):
            crops = [pil(b) if use_pil else prepare(b, meta)[0] for b in images[i:i + batch_size]]
            probs = predictor.probabilities_of_crops(np.stack(crops))
            n += len(probs)
    return n, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    args = ap.parse_args()

    import ray

    from serve_throughput import make_export
    from vitray.batch import score
    from vitray.config import TrackingConfig
    from vitray.predict import resolve_precision

    root = Path(tempfile.mkdtemp(prefix="vitray-bench-score-"))
    os.environ["VITRAY_HOME"] = str(root / "home")
    export = make_export(root / "export", args.arch)
    files = write_inputs(root / "input", args.images)
    precision = resolve_precision(args.precision)
    cores = os.cpu_count() or 1
    print(f"[bench] {args.images:,} 256x256 JPEGs in {len(files)} Parquet files, {args.arch}, {precision}, "
          f"batch {args.batch_size}, {cores} CPUs", flush=True)

    plain_loop(files[:1], export, precision, args.batch_size, False)  # warm-up: page cache, allocator
    results = {}
    for label, use_pil in (("plain loop, PIL", True), ("plain loop, vitray decode", False)):
        n, s = plain_loop(files, export, precision, args.batch_size, use_pil)
        results[label] = n / s
        print(f"[bench] {label:<26} {n:,} images in {s:6.1f}s = {n / s:7.1f} img/s", flush=True)

    t = time.perf_counter()
    ray.init(num_cpus=cores + max(2, int(args.cpus_per_actor * args.concurrency)), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    print(f"[bench] ray.init {time.perf_counter() - t:.1f}s (not counted)", flush=True)
    summary = score(str(export), str(root / "input"), str(root / "output"), batch_size=args.batch_size,
                    concurrency=args.concurrency, cpus_per_actor=args.cpus_per_actor, precision=precision,
                    tracking_cfg=TrackingConfig(enabled=False))
    results["vitray score"] = summary.images_per_s
    print(f"[bench] {'vitray score':<26} {summary.rows_this_run:,} images in {summary.seconds:6.1f}s = "
          f"{summary.images_per_s:7.1f} img/s (concurrency {args.concurrency}, {args.cpus_per_actor:g} CPUs/actor)",
          flush=True)
    ray.shutdown()

    print("\n| pipeline | images/s | vs plain loop (PIL) | vs plain loop (vitray decode) |\n|---|---|---|---|")
    for label, rate in results.items():
        print(f"| {label} | {rate:.1f} | {rate / results['plain loop, PIL']:.2f}x | "
              f"{rate / results['plain loop, vitray decode']:.2f}x |")
    print(f"\nvitray score / plain loop (PIL): {results['vitray score'] / results['plain loop, PIL']:.2f}x (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
