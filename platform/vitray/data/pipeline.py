"""Ray Data pipelines that feed the trainers: read (streaming) -> decode -> augment on CPU tasks.

Each batch leaving the pipeline holds what the trainer expects for its task:

* always ``image`` uint8 (B, 3, S, S) and ``ok`` bool (B,): False marks bytes that failed to decode at read time
  (a shard written by another tool); those rows carry a zero image, the trainer drops and counts them;
* the task's targets, as its data codec (``vitray.tasks.<task>.data``) writes them: classification ``label`` int64
  (B,); segmentation ``mask`` uint8 (B, S, S), 255 = ignore; detection ``boxes`` float32 (B, max_boxes, 4) in pixels
  of the S x S input and ``box_labels`` int64 (B, max_boxes), -1 for padding.

Inputs: packed shards (a folder with manifest.json), or, without packing, WebDataset tars, Parquet files with an
image column, or a plain image folder (``data.format``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitray import storage

from .decode import DecodeError, decode_image
from .formats import Manifest, read_shard, split_of
from .sources import IMAGE_EXTS, SPLIT_NAMES
from .transforms import TrainTransform

__all__ = ["DatasetSpec", "decode_batch", "build_dataset", "build_datasets", "dataset_spec", "shuffle_buffer_rows"]

@dataclass
class DatasetSpec:
    """What a data source holds, whatever its format: the trainer needs nothing else to build its head."""

    task: str
    class_names: list[str]
    files: dict[str, list[str]]  # split -> files
    counts: dict[str, int]
    fingerprint: str = ""
    format: str = "shards"
    nbytes: dict[str, int] | None = None  # split -> encoded bytes on disk, when known (packed shards)
    category_ids: list[int] | None = None  # the source's own class ids (a COCO file's category ids), when it had them


EVAL_MAX_BOXES = 1000  # evaluation keeps every true box (data.max_boxes caps training only): a cap would hide misses


# ------------------------------------------------------------------------------------------ decode + augment
def _codec(task: str):
    from vitray.tasks import get_task

    return get_task(task, "data").load("data")


def read_columns(task: str, files: list[str] | None = None) -> list[str]:
    """The shard columns a task's pipeline reads; with ``files``, the codec's optional columns only where the first
    file has them."""
    codec = _codec(task)
    cols = ["image"] + codec.read_columns()
    if files and codec.optional_columns:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            have = set(pq.read_schema(files[0]).names)
        except (OSError, pa.ArrowInvalid):  # not readable from here (a path only the workers see): ask for all
            return cols
        cols = [c for c in cols if c not in codec.optional_columns or c in have]
    return cols


def decode_batch(batch: dict, *, task: str, train: bool, img_size: int, transforms: dict, max_pixels: int,
                 max_boxes: int = 100, interpolation: str = "bicubic") -> dict:
    """Decode and transform one batch (a Ray Data ``map_batches`` function; also usable on its own). The task's
    codec (``vitray.tasks``) reads its targets and moves them with the pixels.

    Training decodes JPEGs at a reduced DCT scale when the crop will be shrunk anyway; evaluation decodes at full
    size and applies the task's eval transform, exactly as inference does (``vitray.predict``)."""
    codec = _codec(task)
    images_in = batch["image"]
    n = len(images_in)
    if train:
        t = TrainTransform(img_size, scale=tuple(transforms["scale"]), ratio=tuple(transforms["ratio"]),
                           hflip=transforms["hflip"],
                           randaugment=transforms.get("randaugment") if codec.photometric_only_targets else None,
                           interpolation=interpolation, mean=transforms.get("mean", (0.485, 0.456, 0.406)))
        # never decode below what a crop at the smallest scale needs at full resolution
        side = int(np.ceil(img_size / np.sqrt(transforms["scale"][0])))
        min_size = (side, side)
    else:
        t = codec.eval_transform(img_size, transforms["crop_pct"], interpolation)
        min_size = None
    out_img = np.zeros((n, 3, img_size, img_size), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    out = {"image": out_img, "ok": ok, **codec.begin(batch, n, img_size, max_boxes)}
    for i in range(n):
        try:
            img = decode_image(images_in[i], max_pixels, min_size=min_size)
            img, target = codec.read(batch, i, img)
            img, target = codec.transform(t, img, target)
            out_img[i] = np.ascontiguousarray(img.transpose(2, 0, 1))
            codec.store(out, i, target)
        except DecodeError:
            ok[i] = False
    return out


# ------------------------------------------------------------------------------------------------- sources
def _imagefolder_spec(root: Path, val_fraction: float) -> tuple[DatasetSpec, dict]:
    split_dirs = [root / s for s in SPLIT_NAMES if (root / s).is_dir()]
    roots = [(d.name, d) for d in split_dirs] if split_dirs else [(None, root)]
    classes = sorted({c.name for _, r in roots for c in r.iterdir() if c.is_dir() and not c.name.startswith(".")})
    files: dict[str, list[str]] = {}
    labels: dict[str, int] = {}
    for split, r in roots:
        for i, cls in enumerate(classes):
            d = r / cls
            if not d.is_dir():
                continue
            for p in sorted(d.rglob("*")):
                if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                    s = split or split_of(p.relative_to(root).as_posix(), val_fraction)
                    files.setdefault(s, []).append(str(p))
                    labels[str(p)] = i
    spec = DatasetSpec("classification", classes, files, {s: len(f) for s, f in files.items()}, format="imagefolder",
                       nbytes={s: _estimate_bytes(f) for s, f in files.items()})
    return spec, labels


def _estimate_bytes(paths: list[str], sample: int = 256) -> int:
    """A split's size on disk from the sizes of up to ``sample`` of its files (evenly spaced: no stat of millions)."""
    if not paths:
        return 0
    picked = paths[:: max(1, len(paths) // sample)]
    try:
        return int(sum(os.path.getsize(p) for p in picked) / len(picked) * len(paths))
    except OSError:
        return 0


def dataset_spec(data_cfg, val_fraction: float = 0.1) -> DatasetSpec:
    """Describe ``data.path`` for ``data.format`` without reading any pixels."""
    if not data_cfg.path:
        raise ValueError("data.path is not set (a folder of packed shards, or a raw source with data.format)")
    path = str(data_cfg.path)
    fmt = data_cfg.format
    if fmt == "shards":
        m = Manifest.read(path)
        nbytes = {s: sum(x.bytes for x in m.shards if x.split == s) for s in m.splits}
        return DatasetSpec(m.task, m.class_names, {s: m.files(path, s) for s in m.splits}, dict(m.counts),
                           m.fingerprint(), "shards", nbytes, m.source.get("category_ids"))
    if fmt == "imagefolder":
        if storage.is_uri(path):
            raise ValueError(f"data.path {path}: an image folder is read from a local or shared folder; pack it into "
                             "shards (vitray data pack SRC s3://.../shards --format imagefolder) to read it from "
                             "object storage")
        return _imagefolder_spec(Path(path).expanduser(), val_fraction)[0]
    suffix = ".tar" if fmt == "webdataset" else ".parquet"
    if storage.is_dir(path):
        listed = [(p, n) for p, n in storage.list_files(path) if p.endswith(suffix)]
        names_file = storage.join(path, "classes.txt")
    else:
        listed = [(storage.display(path), storage.size(path))] if storage.is_file(path) else []
        names_file = storage.join(path.rsplit("/", 1)[0] if storage.is_uri(path) else str(Path(path).expanduser().parent),
                                  "classes.txt")
    if not listed:
        raise ValueError(f"data.path {path}: no *{suffix} files")
    files: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for f, n in listed:
        split = next((s for s in SPLIT_NAMES if storage.basename(f).startswith(s)), "train")
        files.setdefault(split, []).append(f)
        sizes[split] = sizes.get(split, 0) + n
    names = [line.strip() for line in storage.read_text(names_file).splitlines() if line.strip()] \
        if storage.is_file(names_file) else []
    return DatasetSpec("classification", names, files, {}, format=fmt, nbytes=sizes if fmt == "parquet" else None)


# Read blocks of ~16 MB, decoded 128 rows per call: a 256 MB shard read as one block would be decoded by a single
# task, while 4 MB blocks spent a third of the 2 cores on per-task scheduling (benchmarks/data_throughput.py:
# 691 rows/s at 4 MB / 64 rows vs 923 at 16 MB / 128 rows, 224 px JPEGs on 2 cores).
READ_BLOCK_BYTES = 16 << 20
DECODE_BATCH = 128


SHUFFLE_BUFFER_BYTES = 256 << 20  # decoded images a trainer's local shuffle buffer may hold by default
MAX_SHUFFLE_BUFFER_ROWS = 4096  # a trainer yields nothing until its buffer is full: at every epoch start


def shuffle_buffer_rows(data_cfg, img_size: int) -> int:
    """Rows in each trainer's local shuffle buffer: ``data.shuffle_buffer``, or what fits in 256 MB of decoded
    uint8 images, at least 4 micro batches and at most 4,096 rows (28-32 px images: 4,096; 224 px: 1,741)."""
    if data_cfg.shuffle_buffer is not None:
        return data_cfg.shuffle_buffer
    fits = SHUFFLE_BUFFER_BYTES // (3 * img_size * img_size)
    return int(min(MAX_SHUFFLE_BUFFER_ROWS, max(4 * data_cfg.batch_size, fits)))


def _epoch_seed(data_cfg):
    """Seeded and different every epoch (each execution of the dataset): runs repeat, epochs don't."""
    from ray.data import RandomSeedConfig

    return RandomSeedConfig(seed=data_cfg.seed, reseed_after_execution=True)


def _read(spec: DatasetSpec, split: str, data_cfg, val_fraction: float, train: bool):
    import ray.data
    from ray.data import FileShuffleConfig

    files = spec.files.get(split, [])
    if not files:
        raise ValueError(f"no {split!r} split in {data_cfg.path} (has: {', '.join(spec.files) or 'nothing'})")
    # a plain image folder is one row per file: read tasks of ~512 files (one task per file spent the 2 cores on
    # scheduling: 25 s per epoch of 1,800 digits)
    blocks = max(8, -(-len(files) // 512)) if spec.format == "imagefolder" else max(len(files), 8)
    # a new file order every epoch (seeded); rows are further mixed by the trainer's local shuffle buffer. A plain
    # image folder is read one file per row, so its order is a full random permutation every epoch.
    shuffle = FileShuffleConfig(seed=data_cfg.seed, reseed_after_execution=True) if train and data_cfg.shuffle else None
    if spec.format in ("shards", "parquet"):
        cols = read_columns(spec.task, files)
        ds = ray.data.read_parquet(files, shuffle=shuffle, override_num_blocks=blocks).select_columns(cols)
        ds.context.target_max_block_size = min(ds.context.target_max_block_size or READ_BLOCK_BYTES, READ_BLOCK_BYTES)
        return ds
    if spec.format == "webdataset":
        ds = ray.data.read_webdataset(files, decoder=None, shuffle=shuffle, override_num_blocks=blocks)

        def to_columns(batch):
            keys = [k for k in ("jpg", "jpeg", "png", "webp") if k in batch]
            image = batch[keys[0]] if keys else None
            label_key = next(k for k in ("cls", "cls.txt", "label") if k in batch)
            labels = [int(v.decode() if isinstance(v, (bytes, bytearray)) else v) for v in batch[label_key]]
            return {"image": image, "label": np.asarray(labels, dtype=np.int64)}

        return ds.map_batches(to_columns)
    # imagefolder without packing: labels from the class folder
    _, labels = _imagefolder_spec(Path(data_cfg.path).expanduser(), val_fraction)
    ds = ray.data.read_binary_files(files, include_paths=True, shuffle=shuffle, override_num_blocks=blocks)

    def with_label(batch):
        return {"image": batch["bytes"], "label": np.asarray([labels[p] for p in batch["path"]], dtype=np.int64)}

    return ds.map_batches(with_label)


CACHE_FRACTION = 0.05  # of the object store, for a split's encoded bytes to be cached there


def _fits_in_object_store(spec: DatasetSpec, split: str) -> bool:
    import ray

    size = (spec.nbytes or {}).get(split)
    if not size or not ray.is_initialized():
        return False
    return size < CACHE_FRACTION * ray.cluster_resources().get("object_store_memory", 0)


def _read_small(spec: DatasetSpec, split: str, data_cfg, max_block_rows: int | None = None):
    """A small Parquet split read here with pyarrow and put in the object store as blocks: milliseconds, where a
    Ray Data read + materialize pays its listing and task start-up (5-10 s per split on 2 cores) at every run's
    start. Blocks of ~16 MB, at least 8, so decoding still spreads over the cluster, and for training at most
    ``max_block_rows`` rows, so that the shuffle buffer draws from many randomly ordered blocks at once (rows grouped
    by class in the files are still mixed). None: read it with Ray Data."""
    import pyarrow as pa
    import ray.data

    cols = read_columns(spec.task, spec.files.get(split))
    try:
        if spec.format == "imagefolder":
            _, labels = _imagefolder_spec(Path(data_cfg.path).expanduser(), 0.1)
            paths = spec.files[split]
            table = pa.table({"image": pa.array([Path(p).read_bytes() for p in paths], pa.binary()),
                              "label": pa.array([labels[p] for p in paths], pa.int64())})
        else:
            table = pa.concat_tables([read_shard(f, cols) for f in spec.files[split]])
    except (OSError, pa.ArrowInvalid):  # not readable from the driver (a path only the workers see): Ray Data
        return None
    if max_block_rows and data_cfg.shuffle:
        # one seeded permutation of the rows (in memory, milliseconds): every block is then a uniform sample of the
        # split, whatever order the files keep (an image folder is listed class by class)
        import numpy as np

        table = table.take(np.random.default_rng(data_cfg.seed).permutation(table.num_rows))
    n = max(8, -(-table.nbytes // READ_BLOCK_BYTES))
    step = max(1, -(-table.num_rows // n))
    if max_block_rows:
        step = max(1, min(step, max_block_rows))
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def build_dataset(spec: DatasetSpec, split: str, data_cfg, *, img_size: int, train: bool, decode_batch_size: int = DECODE_BATCH,
                  max_boxes: int = 100, val_fraction: float = 0.1):
    """One split as a streaming Ray Dataset of decoded, transformed batches (decode runs on CPU tasks)."""
    if _fits_in_object_store(spec, split):
        # small split: keep the encoded bytes in the object store, so each epoch skips listing and reading the
        # files (seconds per epoch) while decode and augmentation still run fresh every epoch
        # blocks of at most an eighth of the shuffle buffer (>= 128 rows): it then mixes >= 8 random blocks
        block_rows = max(128, shuffle_buffer_rows(data_cfg, img_size) // 8) if train else None
        ds = _read_small(spec, split, data_cfg, block_rows) if spec.format in ("shards", "parquet", "imagefolder") \
            else None
        ds = ds if ds is not None else _read(spec, split, data_cfg, val_fraction, train).materialize()
        if train and data_cfg.shuffle:
            ds = ds.randomize_block_order(seed=_epoch_seed(data_cfg))
    else:
        ds = _read(spec, split, data_cfg, val_fraction, train)
    if not data_cfg.shuffle:
        ds.context.execution_options.preserve_order = True  # a fixed stream order: reproducible runs
    tr = data_cfg.train_transforms.model_dump() if train else data_cfg.eval_transforms.model_dump()
    tr["mean"] = tuple(data_cfg.mean)
    return ds.map_batches(
        decode_batch, batch_size=decode_batch_size,
        fn_kwargs=dict(task=spec.task, train=train, img_size=img_size, transforms=tr, max_pixels=data_cfg.max_pixels,
                       max_boxes=max_boxes if train else max(max_boxes, EVAL_MAX_BOXES),
                       interpolation=data_cfg.interpolation),
    )


def build_datasets(data_cfg, img_size: int, spec: DatasetSpec | None = None, **kw) -> tuple[DatasetSpec, dict]:
    """The training datasets for a run: ``{"train": ..., "val": ...}`` (val only when the source has it)."""
    spec = spec or dataset_spec(data_cfg)
    out = {"train": build_dataset(spec, data_cfg.train_split, data_cfg, img_size=img_size, train=True, **kw)}
    if spec.files.get(data_cfg.val_split):
        out["val"] = build_dataset(spec, data_cfg.val_split, data_cfg, img_size=img_size, train=False, **kw)
    return spec, out
