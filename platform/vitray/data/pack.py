"""``vitray data pack``: any image source into verified Parquet shards plus ``manifest.json``.

Streaming: samples are probed (fully decoded once, in a bounded thread pool: PIL and libjpeg release the GIL)
and appended to per-split writers that flush a shard as soon as it reaches ``shard_rows`` rows or
``shard_bytes`` bytes, so memory stays flat however large the source. Bad files are skipped with their reason;
the original encoded bytes are stored unchanged.

Order: every split is written in a seeded random order (``shuffle=True``, the default; the seed is recorded in the
manifest), so each shard is a uniform sample of its split whatever the source order (an image folder is sorted by
class: packed in that order, a shard would hold one or two classes and no read-time shuffle could mix them).
Listing sources are simply read in a shuffled order. Streamed sources (WebDataset tars) go through an external
shuffle: each row is appended to one of B bucket files chosen at random, then each bucket is read back, shuffled in
memory and written out as shards; B is sized from the source so that one bucket (~256 MB) is all that is in memory.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import shutil
import tempfile
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vitray import console, storage
from vitray.config import MAX_PIXELS

from .decode import DecodeError, decode_mask, probe_image
from .formats import MANIFEST, Manifest, ShardInfo, schema_for, split_of
from .sources import Sample, Skipped, SourceError, open_source

LOG_DIR = "_logs"  # `vitray data pack` writes its log here (vitray.console)

__all__ = ["pack", "PackError", "SPILL_BUCKET_BYTES"]

SPILL_BUCKET_BYTES = 256 << 20  # external shuffle: source bytes per bucket (what the second pass holds in memory)
MAX_SPILL_BUCKETS = 1024


class PackError(SourceError):
    pass


class _ShardWriter:
    """One split's shards: rows are gathered until a shard is full, then the shard is written to memory, hashed,
    and stored under its name in one atomic write (a local rename, or an object store upload: ``vitray.storage``),
    so the sha256 costs no second read and a reader never sees a partial shard."""

    def __init__(self, out: str, split: str, schema: pa.Schema, shard_rows: int, shard_bytes: int):
        self.out, self.split, self.schema = out, split, schema
        self.shard_rows, self.shard_bytes = shard_rows, shard_bytes
        self.rows: list[dict] = []
        self.nbytes = 0
        self.classes: Counter = Counter()
        self.shards: list[ShardInfo] = []
        self.shard_classes: list[Counter] = []  # per shard: class id -> rows (objects for detection)

    def add(self, row: dict, classes: list[int]) -> None:
        self.rows.append(row)
        self.classes.update(classes)
        self.nbytes += len(row["image"]) + len(row.get("mask") or b"")
        if len(self.rows) >= self.shard_rows or self.nbytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="none", row_group_size=len(self.rows))  # images are compressed already
        data = sink.getvalue()
        storage.write_bytes(storage.join(self.out, name), data)
        self.shards.append(ShardInfo(name, self.split, len(self.rows), data.size,
                                     hashlib.sha256(memoryview(data)).hexdigest()))
        self.shard_classes.append(self.classes)
        self.rows, self.nbytes, self.classes = [], 0, Counter()


class _Spill:
    """The external shuffle for streamed sources. Pass 1 appends each row to one of ``buckets`` files per split,
    chosen at random (small in-memory buffers, appended with pickle: a private temp format, deleted at the end);
    pass 2 reads one bucket at a time, shuffles it and hands its rows to the shard writers. A bucket is a uniform
    random sample of its split, so every shard cut from it is one too."""

    def __init__(self, tmp: Path, buckets: int, rng: random.Random):
        self.tmp, self.buckets, self.rng = tmp, buckets, rng
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.buf: dict[tuple[str, int], list] = {}
        self.buf_bytes: dict[tuple[str, int], int] = {}
        self.flush_bytes = max(1 << 20, (64 << 20) // buckets)  # buffers: at most ~64 MB in all (1 MB each min.)

    def _path(self, key: tuple[str, int]) -> Path:
        return self.tmp / f"{key[0]}-{key[1]:04d}.pkl"

    def add(self, split: str, row: dict, classes: list[int]) -> None:
        key = (split, self.rng.randrange(self.buckets))
        self.buf.setdefault(key, []).append((row, classes))
        self.buf_bytes[key] = self.buf_bytes.get(key, 0) + len(row["image"]) + len(row.get("mask") or b"")
        if self.buf_bytes[key] >= self.flush_bytes:
            self._flush(key)

    def _flush(self, key: tuple[str, int]) -> None:
        if self.buf.get(key):
            with open(self._path(key), "ab") as f:
                pickle.dump(self.buf[key], f, protocol=pickle.HIGHEST_PROTOCOL)
        self.buf[key], self.buf_bytes[key] = [], 0

    def drain(self, writer_for) -> None:
        for key in list(self.buf):
            self._flush(key)
        for key in sorted(self.buf):
            path = self._path(key)
            if not path.exists():
                continue
            rows: list = []
            with open(path, "rb") as f:
                while True:
                    try:
                        rows += pickle.load(f)
                    except EOFError:
                        break
            path.unlink()
            self.rng.shuffle(rows)
            writer = writer_for(key[0])
            for row, classes in rows:
                writer.add(row, classes)
        shutil.rmtree(self.tmp, ignore_errors=True)


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


def _is_pack_file(name: str) -> bool:
    return name == MANIFEST or name.endswith(".parquet") or (name.startswith(".") and name.endswith(".tmp"))


def _prepare_out(out: str, overwrite: bool) -> None:
    if storage.is_uri(out):
        storage.check(out, "output", write=True)
        found = [p for p, _ in storage.list_files(out, recursive=True)]
        if found and not overwrite:
            raise PackError(f"{out}: not empty; pass --overwrite to replace it (two datasets are never mixed)")
        rel = [p[len(out.rstrip("/")) + 1:] for p in found]
        others = [r for r in rel if not (_is_pack_file(r) and "/" not in r) and r.split("/", 1)[0] != LOG_DIR]
        if others:
            raise PackError(f"{out}: holds objects that are not shards (e.g. {others[0]}); choose an empty prefix")
        for p in found:  # only what a pack writes: never a user's other objects
            storage.delete(p)
        storage.delete_tmp(out)
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise PackError(f"{out}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise PackError(f"{out}: not empty; pass --overwrite to replace it (two datasets are never mixed)")
        for p in path.iterdir():  # only what a pack writes: never a user's other files
            if _is_pack_file(p.name):
                p.unlink()
            elif p.is_dir() and p.name in ("_pack_tmp", LOG_DIR):
                shutil.rmtree(p)
        if any(path.iterdir()):
            raise PackError(f"{out}: holds files that are not shards; choose an empty folder")
    path.mkdir(parents=True, exist_ok=True)


def pack(src: str, out: str, fmt: str, *, val_fraction: float = 0.1, test_fraction: float = 0.0,
         shard_rows: int = 10_000, shard_bytes: int = 256 << 20, max_pixels: int = MAX_PIXELS,
         overwrite: bool = False, task: str | None = None, images: str | None = None, masks_dir: str | None = None,
         workers: int | None = None, progress: bool = True, shuffle: bool = True, seed: int = 0) -> Manifest:
    if not 0.0 <= val_fraction < 1.0 or not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise PackError(f"--val-fraction {val_fraction} (+ test {test_fraction}) must be in [0, 1)")
    if shard_rows <= 0 or shard_bytes <= 0:
        raise PackError("--shard-rows and --shard-bytes must be positive")
    source = open_source(fmt, src, task=task, images=images, masks_dir=masks_dir)
    out_path = out if storage.is_uri(out) else str(Path(out).expanduser())
    _prepare_out(out_path, overwrite)
    schema = schema_for(source.task)
    from vitray.tasks import get_task

    codec = get_task(source.task, "data").load("data")
    writers: dict[str, _ShardWriter] = {}
    skipped: list[dict] = []
    class_counts: dict[str, Counter] = {}
    max_label = -1
    t0 = time.perf_counter()
    done = 0
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    rng = random.Random(seed)
    order, spill = None, None
    if shuffle and source.listing:
        order = list(range(len(source.refs)))
        rng.shuffle(order)
        method = "listing"
    elif shuffle:
        buckets = max(1, min(MAX_SPILL_BUCKETS, math.ceil(source.size_hint / SPILL_BUCKET_BYTES)))
        # the spill is local scratch space (a temp folder when the output is an object store)
        scratch = Path(tempfile.mkdtemp(prefix="vitray-pack-")) if storage.is_uri(out_path) \
            else Path(out_path) / "_pack_tmp"
        spill = _Spill(scratch, buckets, rng)
        method = f"external ({buckets} bucket{'s' if buckets > 1 else ''})"
    else:
        method = "source order"

    def writer_for(split: str) -> _ShardWriter:
        if split not in writers:
            writers[split] = _ShardWriter(out_path, split, schema, shard_rows, shard_bytes)
        return writers[split]

    def write(sample: Sample, result) -> None:
        nonlocal done, max_label
        if isinstance(result, str):
            skipped.append({"path": sample.path or sample.id, "reason": result})
            return
        split = sample.split or split_of(sample.id, val_fraction, test_fraction)
        row = {"id": sample.id, "image": sample.data, "width": result[0], "height": result[1], "split": split}
        extra, classes = codec.pack_row(sample)
        row.update(extra)
        if codec.bounded_labels:
            max_label = max([max_label, *classes])
        class_counts.setdefault(split, Counter()).update(classes)
        if spill is not None:
            spill.add(split, row, classes)
        else:
            writer_for(split).add(row, classes)
        done += 1
        if bar is not None and done % 64 == 0:
            bar.update(done + len(skipped), **{"": f"{done / (time.perf_counter() - t0):,.0f} img/s",
                                               "skipped": f"{len(skipped)}"})

    # bounded in-flight window: order is preserved and memory stays flat
    window: deque = deque()
    bar = console.progress("pack", total=len(source.refs) if source.listing else None, unit="images") \
        if progress else None
    try:
        with ThreadPoolExecutor(workers) as pool:
            for item in source.iter_items(order):
                if isinstance(item, Skipped):
                    skipped.append({"path": item.path, "reason": item.reason})
                    continue
                window.append(pool.submit(_probe, item, max_pixels))
                while len(window) >= 4 * workers:
                    write(*window.popleft().result())
            while window:
                write(*window.popleft().result())
        if spill is not None:
            if bar is not None:
                bar.milestone(f"[vitray] read {done:,} images; writing the shuffled shards", final=True)
            spill.drain(writer_for)
        for w in writers.values():
            w.flush()
    finally:
        if bar is not None:
            bar.close()
    if not done:
        raise PackError(f"{src}: no usable image found ({len(skipped)} skipped"
                        + (f", e.g. {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ")"))

    class_names = source.finalize(max_label) if source.finalize else source.class_names
    if codec.bounded_labels and source.finalize is None and max_label >= len(class_names):
        raise PackError(f"labels go up to {max_label} but only {len(class_names)} class names are known")

    def named(counter: Counter) -> dict[str, int]:
        return {class_names[k] if k < len(class_names) else str(k): v for k, v in sorted(counter.items())}

    for w in writers.values():
        for info, counter in zip(w.shards, w.shard_classes):
            info.class_counts = named(counter)
    manifest = Manifest(
        task=source.task,
        class_names=list(class_names),
        counts={s: sum(i.rows for i in w.shards) for s, w in sorted(writers.items())},
        class_counts={s: named(c) for s, c in sorted(class_counts.items())},
        shards=[s for w in writers.values() for s in w.shards],
        skipped=skipped,
        source={"format": fmt, "path": str(src), "val_fraction": val_fraction, "test_fraction": test_fraction,
                "max_pixels": max_pixels, **source.info},
        order={"shuffled": shuffle, "seed": seed if shuffle else None, "method": method},
    )
    manifest.write(out_path)
    manifest.source["seconds"] = round(time.perf_counter() - t0, 3)
    return manifest
