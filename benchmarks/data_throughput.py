"""Data pipeline throughput against plain single-process loops over the same shards, in one run.

    python benchmarks/data_throughput.py                # 20k images at 224 (from 256-320 px JPEGs), 20k at 64 (64 px PNGs)
    python benchmarks/data_throughput.py --rows 4000    # quicker

Prints, each with its baseline measured in the same run:
  1. decode + train augment (random-resized crop, flip) rows/s: vitray's Ray Data pipeline vs a plain loop
     (read the Parquet shards, decode with PIL, same transform, stack uint8 batches), at 224 and 64;
  2. uint8 vs float32 batches (normalising on the CPU workers vs on the trainer);
  3. pack rate: `vitray data pack` vs a plain loop (read file, PIL verify + full decode, write Parquet);
  4. what the row order costs (the sources are class-sorted image folders): pack in source order (--keep-order) vs
     shuffled (the default), and the pipeline read in a fixed order without a shuffle buffer vs with the per-epoch
     seeded block order and the default local shuffle buffer (what the trainers get);
  5. peak memory (RSS) of packing a source ten times larger than the Ray object store configured here.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
from vitray.config import DataConfig  # noqa: E402
from vitray.data.formats import Manifest  # noqa: E402
from vitray.data.transforms import TrainTransform  # noqa: E402


def make_source(root: Path, n: int, kind: str, seed: int = 0) -> None:
    """Photo-like synthetic images (smooth gradients + noise + shapes), in 10 class folders."""
    rng = np.random.default_rng(seed)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if kind == "jpeg224":
            w, h = int(rng.integers(256, 321)), int(rng.integers(256, 321))
        elif kind == "noise":
            w = h = 512
        else:
            w = h = 64
        if kind == "noise":
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            base = rng.uniform(0, 255, 3)
            arr = np.stack([base[k] + (xx * rng.uniform(-0.5, 0.5) + yy * rng.uniform(-0.5, 0.5)) for k in range(3)], -1)
            arr += rng.normal(0, 12, arr.shape)
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        path = root / f"c{i % 10}" / f"{i:06d}"
        if kind == "jpeg224":
            img.save(str(path) + ".jpg", quality=90)
        else:
            img.save(str(path) + ".png", compress_level=1)


def plain_pack(src: Path, out: Path) -> int:
    """Baseline: one process, read each file, PIL verify + decode, append, write one Parquet file per 10k rows."""
    out.mkdir(parents=True)
    rows, n, shard = [], 0, 0
    for path in sorted(src.rglob("*.*")):
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        img.load()
        rows.append({"id": str(path), "image": data, "width": img.width, "height": img.height, "label": int(path.parent.name[1:])})
        n += 1
        if len(rows) == 10_000:
            pq.write_table(pa.Table.from_pylist(rows), out / f"{shard}.parquet", compression="none")
            rows, shard = [], shard + 1
    if rows:
        pq.write_table(pa.Table.from_pylist(rows), out / f"{shard}.parquet", compression="none")
    return n


def plain_loop(files: list[str], size: int, batch: int) -> tuple[int, float]:
    """Baseline: one process reads the shards, decodes with PIL, applies the same train transform, and stacks
    uint8 (B, 3, S, S) batches: the same output the pipeline hands the trainer."""
    t = TrainTransform(size, scale=(0.08, 1.0), hflip=0.5)
    t0 = time.perf_counter()
    n = 0
    buf = []
    for f in files:
        for rb in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["image", "label"]):
            for data in rb.column("image").to_pylist():
                img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                out, *_ = t(img)
                buf.append(out.transpose(2, 0, 1))
                if len(buf) == batch:
                    np.stack(buf)
                    n += len(buf)
                    buf = []
    n += len(buf)
    return n, time.perf_counter() - t0


def ray_pipeline(shards: Path, size: int, batch: int, dtype: str | None = None,
                 shuffle: bool | None = None) -> tuple[int, float, float]:
    """vitray's pipeline. dtype None: uint8 numpy batches (what the plain loop makes). 'uint8' / 'float32': torch
    batches as the trainer receives them, normalised on the trainer (uint8) or on the CPU workers (float32).
    shuffle None: the default order (file order shuffled per epoch), no local buffer; False: a fixed order, no
    buffer; True: the default order plus the default local shuffle buffer, as the trainers read."""
    from vitray.data.pipeline import build_dataset, dataset_spec, shuffle_buffer_rows
    from vitray.data.transforms import normalize_batch

    cfg = DataConfig(path=str(shards), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), batch_size=batch,
                     shuffle=shuffle is not False)
    spec = dataset_spec(cfg)
    ds = build_dataset(spec, "train", cfg, img_size=size, train=True)
    if dtype == "float32":  # the alternative: normalise on the CPU workers, ship 4-byte floats
        mean = np.array(cfg.mean, np.float32).reshape(1, 3, 1, 1) * 255
        std = np.array(cfg.std, np.float32).reshape(1, 3, 1, 1) * 255
        ds = ds.map_batches(lambda b: {**b, "image": (b["image"].astype(np.float32) - mean) / std}, batch_size=None)
    t0 = time.perf_counter()
    first = None
    n = 0
    buffer = shuffle_buffer_rows(cfg, size) if shuffle else None
    it = ds.iter_batches(batch_size=batch, local_shuffle_buffer_size=buffer) if dtype is None else \
        ds.iter_torch_batches(batch_size=batch)
    for b in it:
        x = b["image"]
        if dtype == "uint8":
            x = normalize_batch(x, cfg.mean, cfg.std)  # what the trainer does with uint8 batches
        if first is None:
            first = time.perf_counter() - t0
        n += x.shape[0]
    return n, time.perf_counter() - t0, first


def peak_rss_of_pack(src: Path, out: Path) -> float:
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts from the parent's RSS (this benchmark's Ray driver)
    code = ("import sys; sys.path.insert(0, %r); from vitray.data.pack import pack; "
            "pack(%r, %r, 'imagefolder', shard_bytes=32 << 20, overwrite=True, progress=False); "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])") % (
        str(Path(__file__).resolve().parents[1] / "platform"), str(src), str(out))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024  # KiB -> MiB


def du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--object-store-mb", type=int, default=80,
                    help="the object store size the pack-memory source is ten times larger than")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitray-bench-data-"))
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    from vitray.data.pack import pack

    store = ray.cluster_resources().get("object_store_memory", 0) / 2**20
    print(f"machine: {os.cpu_count()} cores; ray {ray.__version__}; object store {store:,.0f} MiB; rows {args.rows:,}")
    results = []
    for kind, size in (("jpeg224", 224), ("png64", 64)):
        src = work / f"src-{kind}"
        if not src.exists():
            t = time.perf_counter()
            make_source(src, args.rows, kind)
            print(f"made {args.rows:,} {kind} images ({du(src):,.0f} MiB) in {time.perf_counter() - t:.0f}s", flush=True)
        shards = work / f"shards-{kind}"
        # shuffled (the default) and source order, alternated three times, best of each: single packs of the same
        # source varied by +-10% from run to run here, more than the difference being measured
        pack_s = ordered_s = float("inf")
        for _ in range(3):
            for shuffled in (True, False):
                t = time.perf_counter()
                pack(str(src), str(shards if shuffled else work / f"ordered-{kind}"), "imagefolder", val_fraction=0.0,
                     shard_rows=2_000, overwrite=True, progress=False, shuffle=shuffled)
                if shuffled:
                    pack_s = min(pack_s, time.perf_counter() - t)
                else:
                    ordered_s = min(ordered_s, time.perf_counter() - t)
        plain_out = work / f"plain-{kind}"
        if plain_out.exists():
            import shutil

            shutil.rmtree(plain_out)
        t = time.perf_counter()
        plain_pack(src, plain_out)
        plain_pack_s = time.perf_counter() - t
        files = Manifest.read(shards).files(shards, "train")
        n0, t0 = plain_loop(files, size, args.batch)
        n1, t1, first = ray_pipeline(shards, size, args.batch)
        assert n0 == n1 == args.rows, (n0, n1)
        results.append((kind, size, n0 / t0, n1 / t1, first, args.rows / plain_pack_s, args.rows / pack_s))
        fixed, shuffled_read = [], []
        for _ in range(2):  # alternated, best of two each
            nf, tf, _ = ray_pipeline(shards, size, args.batch, shuffle=False)
            ns, ts, _ = ray_pipeline(shards, size, args.batch, shuffle=True)
            fixed.append(nf / tf)
            shuffled_read.append(ns / ts)
        results.append(("order", size, args.rows / ordered_s, args.rows / pack_s, max(fixed), max(shuffled_read), kind))
        print(f"{kind}: plain {n0 / t0:,.0f} rows/s, ray {n1 / t1:,.0f} rows/s (first batch {first:.1f}s); "
              f"pack {args.rows / pack_s:,.0f}/s vs plain {args.rows / plain_pack_s:,.0f}/s", flush=True)
        if size == 224:
            n2, t2, _ = ray_pipeline(shards, size, args.batch, dtype="uint8")
            n3, t3, _ = ray_pipeline(shards, size, args.batch, dtype="float32")
            results.append(("float32-batches", size, n2 / t2, n3 / t3, None, None, None))

    print("\n| measurement | size | baseline | vitray | ratio |")
    print("|---|---|---|---|---|")
    for kind, size, base, ours, first, ppack, vpack in results:
        if kind == "order":
            print(f"| pack: source order (--keep-order) vs shuffled, the default ({vpack}) | - | {base:,.0f} img/s | "
                  f"{ours:,.0f} img/s | {ours / base:.2f}x |")
            print(f"| read: fixed order, no shuffle buffer vs per-epoch order + default shuffle buffer ({vpack}) | {size} | "
                  f"{first:,.0f} rows/s | {ppack:,.0f} rows/s | {ppack / first:.2f}x |")
            continue
        if kind == "float32-batches":
            print(f"| torch batches: uint8 normalised on the trainer (baseline) vs float32 normalised on the CPU workers | {size} | "
                  f"{base:,.0f} rows/s | {ours:,.0f} rows/s | {ours / base:.2f}x |")
            continue
        print(f"| decode + RandomResizedCrop + flip: plain PIL loop vs Ray Data pipeline ({kind}) | {size} | "
              f"{base:,.0f} rows/s | {ours:,.0f} rows/s (first batch {first:.1f}s) | {ours / base:.2f}x |")
        print(f"| pack: plain loop vs vitray data pack ({kind}) | - | {ppack:,.0f} img/s | {vpack:,.0f} img/s | {vpack / ppack:.2f}x |")

    big = work / "src-noise"
    n_big = int(np.ceil(10 * args.object_store_mb * 2**20 / (512 * 512 * 3)))
    if not big.exists():
        make_source(big, n_big, "noise")
    rss = peak_rss_of_pack(big, work / "shards-noise")
    print(f"\npack memory: source {du(big):,.0f} MiB ({n_big} incompressible 512x512 PNGs) = "
          f"{du(big) / args.object_store_mb:.1f}x a {args.object_store_mb} MiB object store; peak RSS of the packer "
          f"{rss:,.0f} MiB (shards of 32 MiB; packing streams file by file and never goes through the object store)")
    ray.shutdown()


if __name__ == "__main__":
    main()
