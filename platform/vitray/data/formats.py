"""The shard format: Parquet files, one row per image, and ``manifest.json`` beside them.

Columns: ``id`` (stable, unique), ``image`` (the original encoded bytes), ``width``, ``height``, ``split``, then the
task's own (its data codec in ``vitray.tasks``): classification ``label``; detection ``boxes`` (x0, y0, x1, y1 in
pixels) and ``box_labels``; segmentation ``mask`` (PNG, one class id per pixel, 255 = ignore). Shards are written per split
(``train-00000.parquet``), so a split is read without filtering.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from vitray import storage

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "IGNORE_INDEX", "ShardInfo", "Manifest", "schema_for", "sha256_file",
    "split_of", "ManifestError", "read_shard",
]

FORMAT_VERSION = 2  # 2: rows in a seeded random order (``order``), per-shard class counts
MANIFEST = "manifest.json"
IGNORE_INDEX = 255  # mask value ignored by the loss and the metrics


class ManifestError(ValueError):
    pass


def schema_for(task: str) -> pa.Schema:
    """The shard schema of a task: the common columns, then the task's own (its data codec's, ``vitray.tasks``)."""
    from vitray.tasks import get_task

    codec = get_task(task, "data").load("data")
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("split", pa.string()),
        *codec.fields(),
    ])


def split_of(sample_id: str, val_fraction: float, test_fraction: float = 0.0) -> str:
    """Deterministic split from a hash of the id: the same on every run and machine (no RNG, no PYTHONHASHSEED)."""
    h = int.from_bytes(hashlib.sha256(sample_id.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < val_fraction:
        return "val"
    if h < val_fraction + test_fraction:
        return "test"
    return "train"


def read_shard(path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file read whole (a shard, or a raw Parquet file), local or in an object store: through one open
    file, which reads a remote object in a few large requests (half the time of pyarrow's per-column range reads on
    a URI; benchmarks/storage_throughput.py)."""
    import pyarrow.parquet as pq

    if not storage.is_uri(path):
        return pq.read_table(path, columns=columns)
    with storage.open_input(path) as f:
        return pq.read_table(f, columns=columns)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardInfo:
    file: str
    split: str
    rows: int
    bytes: int
    sha256: str
    class_counts: dict[str, int] | None = None  # class name -> rows (objects for detection); None: packed before v2


@dataclass
class Manifest:
    task: str
    class_names: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    order: dict = field(default_factory=dict)  # {"shuffled", "seed", "method"}; empty: packed before v2 (source order)
    format_version: int = FORMAT_VERSION

    # ------------------------------------------------------------------ io
    def write(self, folder: str | os.PathLike) -> str:
        """``manifest.json`` in ``folder`` (a local folder or an object store prefix), written atomically: a reader
        never sees half a manifest."""
        path = storage.join(folder, MANIFEST)
        storage.write_text(path, json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Manifest":
        folder = str(folder)
        path = folder if folder.endswith(".json") else storage.join(folder, MANIFEST)
        try:
            text = storage.read_text(path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ManifestError(f"no {MANIFEST} in {storage.display(folder)} (pack the data first: vitray data pack "
                                f"SRC {folder} --format ...)") from None
        except OSError as err:
            raise ManifestError(f"{path}: cannot be read ({err})") from None
        try:
            data = json.loads(text)
            data["shards"] = [ShardInfo(**s) for s in data.get("shards", [])]
            manifest = cls(**data)
        except (ValueError, TypeError) as err:
            raise ManifestError(f"{path}: not a vitray manifest ({err})") from None
        if manifest.format_version > FORMAT_VERSION:
            raise ManifestError(f"{path}: format version {manifest.format_version} is newer than this vitray ({FORMAT_VERSION})")
        return manifest

    # -------------------------------------------------------------- queries
    def files(self, folder: str | os.PathLike, split: str) -> list[str]:
        return [storage.join(folder, s.file) for s in self.shards if s.split == split and s.rows > 0]

    @property
    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "test") if self.counts.get(s)]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """sha256 over the shard hashes: identifies the dataset in MLflow tags and scoring summaries."""
        return hashlib.sha256("".join(sorted(s.sha256 for s in self.shards)).encode()).hexdigest()
