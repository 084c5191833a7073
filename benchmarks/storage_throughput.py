"""Reading the same packed shards from an S3 API server vs from the local disk: the overhead of the object storage
path (pyarrow's S3 filesystem, HTTP, request signing), not of a network: the server is moto on 127.0.0.1.

The shards: scikit-learn's bundled digits as 224 px JPEGs (each digit upscaled, with photo-like noise), packed
once to a local folder and once into a bucket (the same bytes: same sha256). Measured, interleaved over rounds,
the median reported:

* ``read``: every shard read whole (``vitray.data.formats.read_shard``, what the driver's small-split path does;
  Ray Data's read tasks use their own Parquet reader), MB/s and rows/s;
* ``verify``: ``vitray data inspect --verify``'s sha256 + footer check of every shard;
* the baseline: ``pyarrow.parquet.read_table`` given the URI (pyarrow's per-column range reads);
* the server's ceiling: plain boto3 GETs of the same objects (moto is a Python server: what it can send bounds
  every client);
* for scale: the training pipeline's decode + augmentation rate per core, i.e. what a read path must keep up with.

Usage: python benchmarks/storage_throughput.py [--images 4000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT / "tests"))


def _images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for i in range(n):
        img, label = d.images[i % len(d.images)], int(d.target[i % len(d.images)])
        big = np.kron(img * (255.0 / 16.0), np.ones((28, 28)))  # 8 -> 224 px
        rgb = np.clip(big[..., None] + rng.normal(0, 12, (224, 224, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / f"digit_{i:05d}.jpg").write_bytes(buf.getvalue())


def _read_all(files: list[str]) -> tuple[int, int]:
    from vitray.data.formats import read_shard

    rows = nbytes = 0
    for f in files:
        t = read_shard(f)
        rows += t.num_rows
        nbytes += t.nbytes
    return rows, nbytes


def _decode_rate(shard: str, rows: int = 256) -> float:
    """Rows/s of the training pipeline's decode + augmentation on one core: what a read path has to keep up with."""
    import pyarrow.parquet as pq

    from vitray.config import DataConfig
    from vitray.data.pipeline import decode_batch

    data = DataConfig()
    images = pq.read_table(shard, columns=["image", "label"]).slice(0, rows).to_pydict()
    tr = {**data.train_transforms.model_dump(), "mean": tuple(data.mean)}
    kw = dict(task="classification", train=True, img_size=224, transforms=tr, max_pixels=data.max_pixels)
    decode_batch(images, **kw)  # warm
    t0 = time.perf_counter()
    decode_batch(images, **kw)
    return rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from s3_server import s3_server

    from vitray.data.formats import Manifest
    from vitray.data.inspection import verify
    from vitray.data.pack import pack

    with tempfile.TemporaryDirectory(prefix="vitray-bench-s3-") as tmp, s3_server() as server:
        os.environ.update(server.env)
        bucket = server.create_bucket("bench")
        src = Path(tmp) / "images"
        _images(src, args.images)
        local, remote = str(Path(tmp) / "shards"), f"{bucket}/shards"
        t0 = time.perf_counter()
        m_local = pack(str(src), local, "imagefolder", shard_rows=500, progress=False)
        pack_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        m_remote = pack(str(src), remote, "imagefolder", shard_rows=500, progress=False)
        pack_remote = time.perf_counter() - t0
        assert [s.sha256 for s in m_local.shards] == [s.sha256 for s in m_remote.shards]
        size = sum(s.bytes for s in m_local.shards)
        files = {name: [f for split in m.splits for f in m.files(root, split)]
                 for name, root, m in (("local", local, Manifest.read(local)), ("s3", remote, Manifest.read(remote)))}
        _read_all(files["local"]), _read_all(files["s3"])  # warm: page cache, connections
        times: dict[str, list[float]] = {"local read": [], "s3 read": [], "local verify": [], "s3 verify": [],
                                         "server GET": [], "s3 read, pyarrow URI": []}
        import boto3
        import pyarrow.parquet as pq

        client = boto3.client("s3")
        rows = 0
        for _ in range(args.rounds):
            for name, root in (("local", local), ("s3", remote)):
                t0 = time.perf_counter()
                rows, _ = _read_all(files[name])
                times[f"{name} read"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert verify(root) == []
                times[f"{name} verify"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the baseline vitray improves on: pyarrow's own reader given the URI
            for f in files["s3"]:
                pq.read_table(f)
            times["s3 read, pyarrow URI"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()  # the server's own ceiling: plain GETs of the same objects, bytes discarded
            for f in files["s3"]:
                b, _, key = f[len("s3://"):].partition("/")
                client.get_object(Bucket=b, Key=key)["Body"].read()
            times["server GET"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        decode = _decode_rate(files["local"][0])
        print(f"shards: {len(m_local.shards)} files, {size / 2**20:.1f} MiB, {rows:,} images (224 px JPEG); "
              f"{args.rounds} interleaved rounds, medians; S3 = moto on 127.0.0.1")
        print(f"pack: local {pack_local:.2f} s, s3 {pack_remote:.2f} s (s3/local time x{pack_remote / pack_local:.2f})")
        print("| path | read MB/s | read rows/s | verify MB/s |")
        print("|---|---|---|---|")
        for name in ("local", "s3"):
            print(f"| {name} | {size / 2**20 / med[f'{name} read']:,.0f} | {rows / med[f'{name} read']:,.0f} | "
                  f"{size / 2**20 / med[f'{name} verify']:,.0f} |")
        print(f"| s3, pyarrow.parquet.read_table(URI) | {size / 2**20 / med['s3 read, pyarrow URI']:,.0f} | "
              f"{rows / med['s3 read, pyarrow URI']:,.0f} | - |")
        print(f"| server ceiling (boto3 GETs of the same objects) | {size / 2**20 / med['server GET']:,.0f} | "
              f"{rows / med['server GET']:,.0f} | - |")
        print(f"s3 / local throughput: read x{med['local read'] / med['s3 read']:.2f}, "
              f"verify x{med['local verify'] / med['s3 verify']:.2f}")
        cores = os.cpu_count() or 1
        print(f"decode + train transform (the pipeline's decode_batch, 224 px): {decode:,.0f} rows/s per core; "
              f"s3 read / decode on all {cores} cores: x{rows / med['s3 read'] / (decode * cores):.1f}")


if __name__ == "__main__":
    main()
