"""``vitray data pack``: any image source into verified Parquet shards plus ``manifest.json``.

Streaming: samples are probed (fully decoded once, in a bounded thread pool: PIL and libjpeg release the GIL)
and appended to per-split writers that flush a shard as soon as it reaches ``shard_rows`` rows or
``shard_bytes`` bytes, so memory stays flat however large the source. Bad files are skipped with their reason;
the original encoded bytes are stored unchanged.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .decode import DecodeError, decode_mask, probe_image
from .formats import MANIFEST, Manifest, ShardInfo, schema_for, sha256_file, split_of
from .sources import Sample, Skipped, SourceError, open_source

__all__ = ["pack", "PackError"]


class PackError(SourceError):
    pass


class _ShardWriter:
    def __init__(self, out: Path, split: str, schema: pa.Schema, shard_rows: int, shard_bytes: int):
        self.out, self.split, self.schema = out, split, schema
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.rows: list[dict] = []
        self.nbytes = 0
        self.shards: list[ShardInfo] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.nbytes += len(row["image"]) + len(row.get("mask") or b"")
        if len(self.rows) >= self.shard_rows or self.nbytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        tmp = self.out / f".{name}.tmp"
        pq.write_table(table, tmp, compression="none", row_group_size=len(self.rows))  # images are compressed already
        os.replace(tmp, self.out / name)
        self.shards.append(ShardInfo(name, self.split, len(self.rows), (self.out / name).stat().st_size,
                                     sha256_file(self.out / name)))
        self.rows, self.nbytes = [], 0


def _probe(sample: Sample, max_pixels: int) -> tuple[Sample, tuple[int, int] | str]:
    try:
        w, h, _ = probe_image(sample.data, max_pixels)
        if sample.mask is not None:
            m = decode_mask(sample.mask)
            if m.shape != (h, w):
                return sample, f"mask is {m.shape[1]}x{m.shape[0]}, image {w}x{h}"
        return sample, (w, h)
    except DecodeError as err:
        return sample, str(err)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PackError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PackError(f"{out}: not empty; pass --overwrite to replace it (two datasets are never mixed)")
        for p in out.iterdir():  # only what a pack writes: never a user's other files
            if p.name == MANIFEST or p.suffix == ".parquet" or p.name.endswith(".parquet.tmp"):
                p.unlink()
            elif p.is_dir() and p.name == "_pack_tmp":
                shutil.rmtree(p)
        if any(out.iterdir()):
            raise PackError(f"{out}: holds files that are not shards; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)


def pack(src: str, out: str, fmt: str, *, val_fraction: float = 0.1, test_fraction: float = 0.0,
         shard_rows: int = 10_000, shard_bytes: int = 256 << 20, max_pixels: int = 64_000_000,
         overwrite: bool = False, task: str | None = None, images: str | None = None, masks_dir: str | None = None,
         workers: int | None = None, progress: bool = True) -> Manifest:
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise PackError(f"--val-fraction {val_fraction} (+ test {test_fraction}) must be in [0, 1)")
    if shard_rows <= 0 or shard_bytes <= 0:
        raise PackError("--shard-rows and --shard-bytes must be positive")
    source = open_source(fmt, src, task=task, images=images, masks_dir=masks_dir)
    out_path = Path(out).expanduser()
    _prepare_out(out_path, overwrite)
    schema = schema_for(source.task)
    writers: dict[str, _ShardWriter] = {}
    skipped: list[dict] = []
    class_counts: dict[str, Counter] = {}
    max_label = -1
    t0 = time.perf_counter()
    done = 0
    workers = workers or max(1, min(8, os.cpu_count() or 1))

    def write(sample: Sample, result) -> None:
        nonlocal done, max_label
        if isinstance(result, str):
            skipped.append({"path": sample.path or sample.id, "reason": result})
            return
        split = sample.split or split_of(sample.id, val_fraction, test_fraction)
        row = {"id": sample.id, "image": sample.data, "width": result[0], "height": result[1], "split": split}
        counter = class_counts.setdefault(split, Counter())
        if source.task == "classification":
            row["label"] = sample.label
            counter[sample.label] += 1
            max_label = max(max_label, sample.label)
        elif source.task == "detection":
            row["boxes"], row["box_labels"] = sample.boxes, sample.box_labels
            counter.update(sample.box_labels)
        else:
            row["mask"] = sample.mask
            ids = set(decode_mask(sample.mask).ravel().tolist()) - {255}
            counter.update(ids)
            max_label = max([max_label, *ids])
        if split not in writers:
            writers[split] = _ShardWriter(out_path, split, schema, shard_rows, shard_bytes)
        writers[split].add(row)
        done += 1
        if progress and done % 1000 == 0:
            rate = done / (time.perf_counter() - t0)
            print(f"\rpacked {done:,} images ({rate:,.0f}/s), skipped {len(skipped)}", end="", file=sys.stderr, flush=True)

    # bounded in-flight window: order is preserved and memory stays flat
    window: deque = deque()
    with ThreadPoolExecutor(workers) as pool:
        for item in source.items:
            if isinstance(item, Skipped):
                skipped.append({"path": item.path, "reason": item.reason})
                continue
            window.append(pool.submit(_probe, item, max_pixels))
            while len(window) >= 4 * workers:
                write(*window.popleft().result())
        while window:
            write(*window.popleft().result())
    for w in writers.values():
        w.flush()
    if progress and done >= 1000:
        print(file=sys.stderr)
    if not done:
        raise PackError(f"{src}: no usable image found ({len(skipped)} skipped"
                        + (f", e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ")"))

    class_names = source.finalize(max_label) if source.finalize else source.class_names
    if source.task == "classification" and max_label >= len(class_names):
        raise PackError(f"labels go up to {max_label} but only {len(class_names)} class names are known")
    manifest = Manifest(
        task=source.task,
        class_names=list(class_names),
        counts={s: sum(i.rows for i in w.shards) for s, w in sorted(writers.items())},
        class_counts={s: {class_names[k] if k < len(class_names) else str(k): v for k, v in sorted(c.items())}
                      for s, c in sorted(class_counts.items())},
        shards=[s for w in writers.values() for s in w.shards],
        skipped=skipped,
        source={"format": fmt, "path": str(src), "val_fraction": val_fraction, "test_fraction": test_fraction,
                "max_pixels": max_pixels, **source.info},
    )
    manifest.write(out_path)
    manifest.source["seconds"] = round(time.perf_counter() - t0, 3)
    return manifest
