"""What a scoring job reads, cut into units: the unit is what gets written (and skipped on a rerun) as one.

* packed shards (a folder with ``manifest.json``): one unit per shard, ids from the ``id`` column;
* Parquet (a file or a folder of them) with an image column: one unit per file, ids from an ``id`` column when
  there is one, else ``<file stem>:<row>``;
* WebDataset tars (a ``.tar`` or a folder of them): one unit per tar, ids ``<tar stem>/<key>``;
* a plain image folder (searched recursively): units of ``files_per_unit`` files in sorted order, ids the paths
  relative to the folder.

:func:`discover` lists the units and their row counts without decoding anything; the input's fingerprint (sha256
over the unit list) ties an output folder to the input it scored.
"""
from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vitray import storage
from vitray.config import ConfigError
from vitray.data.sources import tar_samples

__all__ = ["Unit", "ScoreInput", "discover", "read_unit", "InputError", "FORMATS"]

FORMATS = ("auto", "shards", "parquet", "webdataset", "images")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
READ_ROWS = 256  # rows per batch a unit is read in


class InputError(ConfigError):
    """An input that cannot be scored (missing, empty, unreadable listing): the CLI exits 2 with the message."""


@dataclass
class Unit:
    key: str            # output file part-<key>.parquet
    kind: str           # parquet | webdataset | images
    path: str           # the file (parquet, tar) or the image folder root
    rows: int
    files: list[str] = field(default_factory=list)  # images: the unit's files, relative to path
    image_column: str = "image"
    id_column: str | None = "id"
    digest: str = ""    # what the content is: the shard's sha256 from the manifest, else size + mtime of the files


@dataclass
class ScoreInput:
    format: str
    root: str
    units: list[Unit]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)

    @property
    def fingerprint(self) -> str:
        """sha256 of the unit list: keys, files, row counts and each unit's content digest (the manifest's shard
        hashes for packed shards; sizes and modification times otherwise), so a rebuilt input is a new input."""
        data = json.dumps([[u.key, u.kind, storage.basename(u.path), u.rows, u.files, u.digest] for u in self.units],
                          sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()

    def to_json(self) -> dict:
        return {"format": self.format, "root": self.root, "rows": self.rows, "fingerprint": self.fingerprint,
                "units": [asdict(u) for u in self.units]}


def _detect(path: str) -> str:
    if storage.is_dir(path):
        if storage.is_file(storage.join(path, "manifest.json")):
            return "shards"
        names = [storage.basename(p) for p, _ in storage.list_files(path)]
        if any(n.endswith(".parquet") for n in names):
            return "parquet"
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        return "images"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith(".tar"):
        return "webdataset"
    raise InputError(f"input {path}: not a folder, a .parquet or a .tar file")


def _listed(root: str, suffix: str) -> list[str]:
    """``root`` itself (a file), or the files of the folder or prefix ending in ``suffix``, sorted."""
    if not storage.is_dir(root):
        return [root]
    return [p for p, _ in storage.list_files(root) if p.endswith(suffix)]


def _stat_digest(paths) -> str:
    h = hashlib.sha256()
    for p in paths:
        size, mtime = storage.stat(p)
        h.update(f"{p}:{size}:{mtime};".encode())
    return h.hexdigest()


def _safe_key(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _parquet_unit(f: str, image_column: str | None) -> Unit:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_input(f) as fh:
            pf = pq.ParquetFile(fh)
            schema, num_rows = pf.schema_arrow, pf.metadata.num_rows
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"input {f}: not a readable Parquet file ({str(err)[:200]})") from None
    binary = [n for n in schema.names if pa.types.is_binary(schema.field(n).type)
              or pa.types.is_large_binary(schema.field(n).type)]
    col = image_column or ("image" if "image" in schema.names else (binary[0] if binary else None))
    if col is None or col not in schema.names:
        raise InputError(f"input {f}: no image column (binary columns: {', '.join(binary) or 'none'}); "
                         "name it with --image-column")
    id_col = "id" if "id" in schema.names else None
    return Unit(_safe_key(_stem(f)), "parquet", f, num_rows, image_column=col, id_column=id_col,
                digest=_stat_digest([f]))


def _stem(path: str) -> str:
    return storage.basename(path).rsplit(".", 1)[0]


def discover(path: str, fmt: str = "auto", *, image_column: str | None = None, files_per_unit: int = 1024) -> ScoreInput:
    if storage.is_uri(path):
        try:
            storage.check(path, "--input")
        except storage.StorageError as err:
            raise InputError(str(err)) from None
        root = path.rstrip("/")
    else:
        root = str(Path(path).expanduser())
    if not storage.exists(root):
        raise InputError(f"input {path}: no such file or folder")
    fmt = _detect(root) if fmt == "auto" else fmt
    units: list[Unit] = []
    if fmt == "shards":
        from vitray.data.formats import Manifest, ManifestError

        try:
            m = Manifest.read(root)
        except ManifestError as err:
            raise InputError(str(err)) from None
        units = [Unit(_safe_key(_stem(s.file)), "parquet", storage.join(root, s.file), s.rows, digest=s.sha256)
                 for s in m.shards if s.rows]
    elif fmt == "parquet":
        units = [_parquet_unit(f, image_column) for f in _listed(root, ".parquet")]
    elif fmt == "webdataset":
        for t in _listed(root, ".tar"):
            try:
                n = sum(1 for _ in tar_samples(t, read=False))
            except (tarfile.TarError, OSError, EOFError) as err:
                raise InputError(f"input {t}: unreadable tar ({err})") from None
            units.append(Unit(_safe_key(_stem(t)), "webdataset", t, n, digest=_stat_digest([t])))
    elif fmt == "images":
        if not storage.is_dir(root):
            raise InputError(f"input {path}: --format images expects a folder")
        files = sorted(_relative(p, root) for p, _ in storage.list_files(root, recursive=True)
                       if p.lower().endswith(IMAGE_EXTS))
        for i in range(0, len(files), files_per_unit):
            chunk = files[i:i + files_per_unit]
            units.append(Unit(f"images-{i // files_per_unit:06d}", "images", str(root), len(chunk), files=chunk,
                              digest=_stat_digest(storage.join(root, f) for f in chunk)))
    else:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    units = [u for u in units if u.rows > 0]
    if not units:
        raise InputError(f"input {path}: nothing to score (no images found as {fmt})")
    keys = [u.key for u in units]
    if len(set(keys)) != len(keys):
        raise InputError(f"input {path}: two input files map to the same output name; rename one of them")
    return ScoreInput(fmt, root, units)


def _relative(full: str, root: str) -> str:
    return full[len(root.rstrip("/")) + 1:] if storage.is_uri(root) else Path(full).relative_to(root).as_posix()


def read_unit(unit: Unit):
    """Yield batches ``{"id", "source", "image", "read_error"}`` (lists) of one unit, in a stable order.
    A sample that cannot be read keeps its row: empty ``image`` and the reason in ``read_error``."""
    def batch():
        return {"id": [], "source": [], "image": [], "read_error": []}

    out = batch()

    def add(sid, source, data, err=None):
        out["id"].append(sid)
        out["source"].append(source)
        out["image"].append(data or b"")
        out["read_error"].append(err)

    if unit.kind == "parquet":
        import pyarrow.parquet as pq

        cols = [unit.image_column] + ([unit.id_column] if unit.id_column else [])
        row = 0
        stem = _stem(unit.path)
        with storage.open_input(unit.path) as fh:
            for rb in pq.ParquetFile(fh).iter_batches(batch_size=READ_ROWS, columns=cols):
                images = rb.column(unit.image_column).to_pylist()
                ids = rb.column(unit.id_column).to_pylist() if unit.id_column \
                    else [f"{stem}:{row + i}" for i in range(len(images))]
                yield {"id": [str(i) for i in ids], "source": [unit.path] * len(images),
                       "image": [b or b"" for b in images],
                       "read_error": [None if b else "empty image value" for b in images]}
                row += len(images)
        return
    if unit.kind == "webdataset":
        for key, parts in tar_samples(unit.path):
            ext = next((e for e in TAR_IMAGE_EXTS if e in parts), None)
            sid = f"{_stem(unit.path)}/{key}"
            if ext is None:
                add(sid, f"{unit.path}:{key}", b"", f"no image member (has: {', '.join(sorted(parts))})")
            else:
                add(sid, f"{unit.path}:{key}.{ext}", parts[ext])
            if len(out["id"]) >= READ_ROWS:
                yield out
                out = batch()
    else:
        for rel in unit.files:
            full = storage.join(unit.path, rel)
            try:
                add(rel, full, storage.read_bytes(full))
            except OSError as err:
                add(rel, str(full), b"", f"unreadable file: {err.strerror or err}")
            if len(out["id"]) >= READ_ROWS:
                yield out
                out = batch()
    if out["id"]:
        yield out
