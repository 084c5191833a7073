"""Reading the same packed shards from an S3 API server vs from the local disk: the overhead of the object storage
path (pyarrow's S3 filesystem, HTTP, request signing), not of a network: the server is moto on 127.0.0.1.

The shards: scikit-learn's bundled digits as 224 px JPEGs (each digit upscaled, with photo-like noise), packed
once to a local folder and once into a bucket (the same bytes: same sha256). Measured, interleaved over rounds,
the median reported:

* ``read``: every shard read whole with ``pyarrow.parquet.read_table`` (what the driver's small-split path and each
  Ray Data read task do), MB/s and rows/s;
* ``verify``: ``vitray data inspect --verify``'s sha256 + footer check of every shard.

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
    import pyarrow.parquet as pq

    rows = nbytes = 0
    for f in files:
        t = pq.read_table(f)
        rows += t.num_rows
        nbytes += t.nbytes
    return rows, nbytes


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
        times: dict[str, list[float]] = {"local read": [], "s3 read": [], "local verify": [], "s3 verify": []}
        rows = 0
        for _ in range(args.rounds):
            for name, root in (("local", local), ("s3", remote)):
                t0 = time.perf_counter()
                rows, _ = _read_all(files[name])
                times[f"{name} read"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                assert verify(root) == []
                times[f"{name} verify"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"shards: {len(m_local.shards)} files, {size / 2**20:.1f} MiB, {rows:,} images (224 px JPEG); "
              f"{args.rounds} interleaved rounds, medians; S3 = moto on 127.0.0.1")
        print(f"pack: local {pack_local:.2f} s, s3 {pack_remote:.2f} s (s3/local time x{pack_remote / pack_local:.2f})")
        print("| path | read MB/s | read rows/s | verify MB/s |")
        print("|---|---|---|---|")
        for name in ("local", "s3"):
            print(f"| {name} | {size / 2**20 / med[f'{name} read']:,.0f} | {rows / med[f'{name} read']:,.0f} | "
                  f"{size / 2**20 / med[f'{name} verify']:,.0f} |")
        print(f"s3 / local throughput: read x{med['local read'] / med['s3 read']:.2f}, "
              f"verify x{med['local verify'] / med['s3 verify']:.2f}")


if __name__ == "__main__":
    main()
