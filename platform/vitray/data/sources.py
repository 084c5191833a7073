"""Image sources ``vitray data pack`` reads: each yields samples (or skipped files with their reason).

A source never decodes pixels itself: it hands over the original encoded bytes plus annotations, and the packer
probes them (in parallel) and writes them unchanged. Two kinds, for the packer's shuffle:

* listing sources (image folders, COCO files, mask folders, scikit-learn's digits) know every sample before reading
  any: they give ``refs`` (one cheap reference per sample, in a stable order) and ``load(ref)``, so the packer reads
  them in a seeded random order at no extra cost;
* streamed sources (WebDataset tars) only give ``items`` in their stored order, plus ``size_hint`` (bytes) so the
  packer can size its external shuffle.
"""
from __future__ import annotations

import contextlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


__all__ = ["Sample", "Skipped", "SourceError", "open_source", "tar_samples", "SOURCE_FORMATS"]

SOURCE_FORMATS = ("imagefolder", "coco", "masks", "webdataset", "sklearn-digits")
SPLIT_NAMES = ("train", "val", "test")
UNLABELED_TASK = "mae"  # the task a pack of images without labels is for (the one that trains on them)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class SourceError(ValueError):
    """The source as a whole is unusable (missing, empty, wrong layout): exit 2."""


@dataclass
class Sample:
    id: str
    data: bytes
    split: str | None = None  # None: decided by a hash of the id
    label: int | None = None
    boxes: list[list[float]] | None = None
    box_labels: list[int] | None = None
    mask: bytes | None = None
    caption: str | None = None
    path: str = ""


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class Source:
    task: str
    class_names: list[str]
    items: Iterator[Sample | Skipped] | None = None  # streamed sources: samples in stored order
    info: dict = field(default_factory=dict)
    finalize: object = None  # optional callable(max_label_seen) -> class_names, for sources that learn them while read
    refs: list | None = None  # listing sources: one reference per sample, in a stable order ...
    load: Callable[[object], "Sample | Skipped"] | None = None  # ... and how to read one
    size_hint: int = 0  # streamed sources: their size in bytes (sizes the packer's external shuffle)

    @property
    def listing(self) -> bool:
        return self.refs is not None

    def iter_items(self, order: list[int] | None = None) -> Iterator[Sample | Skipped]:
        """Every sample: a listing source in ``order`` (indices into ``refs``; None: stored order)."""
        if not self.listing:
            yield from self.items
            return
        for i in (range(len(self.refs)) if order is None else order):
            yield self.load(self.refs[i])


def _read(path: Path) -> bytes | Skipped:
    try:
        return path.read_bytes()
    except OSError as err:
        return Skipped(str(path), f"unreadable file: {err.strerror or err}")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


# --------------------------------------------------------------------------------------------- imagefolder
def imagefolder(src: Path) -> Source:
    if not src.is_dir():
        raise SourceError(f"{src}: not a folder (imagefolder expects SRC/CLASS/IMAGE or SRC/SPLIT/CLASS/IMAGE)")
    split_dirs = [src / s for s in SPLIT_NAMES if (src / s).is_dir()]
    roots = [(d.name, d) for d in split_dirs] if split_dirs else [(None, src)]
    classes = sorted({c.name for _, r in roots for c in r.iterdir() if c.is_dir() and not c.name.startswith(".")})
    if not classes:
        loose = [(p.relative_to(src).as_posix(), split) for split, r in roots for p in sorted(r.iterdir())
                 if p.is_file() and not p.name.startswith(".")]
        if not loose:
            raise SourceError(f"{src}: no class folders and no images found (imagefolder expects SRC/CLASS/IMAGE, "
                              "SRC/train/CLASS/IMAGE, or a flat folder of images: an unlabeled set)")
        return _unlabeled(src, loose, bool(split_dirs))
    index = {c: i for i, c in enumerate(classes)}
    refs = []  # (relative path, split, label): small, so millions of files list in memory
    for split, root in roots:
        for cls in classes:
            folder = root / cls
            if folder.is_dir():
                refs += [(p.relative_to(src).as_posix(), split, index[cls]) for p in _files(folder)]
    if not refs:
        raise SourceError(f"{src}: the class folders hold no files")

    def load(ref):
        rel, split, label = ref
        path = src / rel
        data = _read(path)
        return data if isinstance(data, Skipped) else Sample(rel, data, split, label=label, path=str(path))

    return Source("classification", classes, info={"splits_from_source": bool(split_dirs)}, refs=refs, load=load)


def _unlabeled(src: Path, refs: list[tuple[str, str | None]], splits_from_source: bool) -> Source:
    """A flat folder of images (SRC/IMAGE or SRC/SPLIT/IMAGE): images without labels, packed for the task that
    trains on them (``mae``); any labelled pack trains it too."""
    def load(ref):
        rel, split = ref
        path = src / rel
        data = _read(path)
        return data if isinstance(data, Skipped) else Sample(rel, data, split, path=str(path))

    return Source(UNLABELED_TASK, [], info={"splits_from_source": splits_from_source, "labels": "none"}, refs=refs,
                  load=load)


# ---------------------------------------------------------------------------------------------------- coco
def _rle_decode(rle: dict, h: int, w: int) -> np.ndarray:
    counts = rle["counts"]
    if isinstance(counts, str):  # COCO's compressed RLE string (pycocotools' rleFrString)
        raw, out, p = counts.encode(), [], 0
        while p < len(raw):
            x, k, more = 0, 0, True
            while more:
                c = raw[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(out) > 2:
                x += out[-2]
            out.append(x)
        counts = out
    flat = np.zeros(h * w, dtype=np.uint8)
    pos, val = 0, 0
    for run in counts:
        if val:
            flat[pos:pos + run] = 1
        pos += run
        val ^= 1
    return flat.reshape(w, h).T  # column-major, as COCO stores it


def _rasterise(seg, h: int, w: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    if isinstance(seg, dict):
        return _rle_decode(seg, *seg.get("size", (h, w)))
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in seg:
        if len(poly) >= 6:
            draw.polygon([float(v) for v in poly], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def _png(mask: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


COCO_DEFAULT_TASK = "detection"


def _coco_codec(task: str):
    """The data codec of a task that reads COCO annotations (``from_coco``)."""
    from vitray.tasks import TASKS, TaskError, get_task

    readers = [n for n, t in TASKS.items() if t.has("data") and hasattr(t.load("data"), "from_coco")]
    try:
        codec = get_task(task, "data").load("data")
    except TaskError as err:
        raise SourceError(f"--task {task}: {err}") from None
    if not hasattr(codec, "from_coco"):
        raise SourceError(f"--task {task}: COCO packs for {' or '.join(readers)}")
    return codec


def coco(src: Path, images: Path | None, task: str) -> Source:
    ann_path = src
    if not ann_path.is_file():
        raise SourceError(f"{ann_path}: COCO annotation file not found (SRC is the instances JSON for --format coco)")
    codec = _coco_codec(task)
    by_category = getattr(codec, "coco_categories", True)  # False: COCO captions (no categories)
    try:
        data = json.loads(ann_path.read_text())
        cats = sorted(data["categories"] if by_category else data.get("categories", []), key=lambda c: c["id"])
        imgs = data["images"]
        anns = data.get("annotations", [])
    except (ValueError, KeyError, TypeError) as err:
        raise SourceError(f"{ann_path}: not a COCO instances file ({type(err).__name__}: {err})") from None
    if not imgs:
        raise SourceError(f"{ann_path}: no images listed")
    image_dir = images or ann_path.parent
    if not image_dir.is_dir():
        raise SourceError(f"{image_dir}: image folder not found (pass --images DIR)")
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = {}
    for a in anns:
        by_image.setdefault(a["image_id"], []).append(a)
    names = codec.coco_class_names([c["name"] for c in cats])

    def load(im):
        path = image_dir / im["file_name"]
        if not path.is_file():
            return Skipped(str(path), "file not found (listed in the annotations)")
        raw = _read(path)
        if isinstance(raw, Skipped):
            return raw
        split = next((s for s in SPLIT_NAMES if im["file_name"].startswith(s + "/")), None)
        sample = Sample(im["file_name"], raw, split, path=str(path))
        h, w = int(im["height"]), int(im["width"])
        objs = [a for a in by_image.get(im["id"], []) if not by_category or a.get("category_id") in cat_index]
        targets = codec.from_coco(objs, h, w, cat_index)  # the task's targets (its data codec), or why none
        if isinstance(targets, str):
            return Skipped(str(path), targets)
        for key, value in targets.items():
            setattr(sample, key, value)
        return sample

    return Source(task, names, info={"annotations": str(ann_path), "images": str(image_dir),
                                     "category_ids": [int(c["id"]) for c in cats]},
                  refs=sorted(imgs, key=lambda i: i["file_name"]), load=load)


# --------------------------------------------------------------------------------------------------- masks
def _class_file(folder: Path) -> list[str] | None:
    f = folder / "classes.txt"
    return [line.strip() for line in f.read_text().splitlines() if line.strip()] if f.is_file() else None


def masks(src: Path, mask_dir: Path | None) -> Source:
    image_dir = src / "images"
    mask_dir = mask_dir or src / "masks"
    for d, what in ((image_dir, "images"), (mask_dir, "masks")):
        if not d.is_dir():
            raise SourceError(f"{d}: folder not found (--format masks expects SRC/images and SRC/masks, or --masks DIR)")
    mask_by_stem = {p.relative_to(mask_dir).with_suffix("").as_posix(): p for p in _files(mask_dir)}
    images = _files(image_dir)
    if not images:
        raise SourceError(f"{image_dir}: no files")
    names = _class_file(src)

    def load(path: Path):
        rel = path.relative_to(image_dir).as_posix()
        split = next((s for s in SPLIT_NAMES if rel.startswith(s + "/")), None)
        mpath = mask_by_stem.get(path.relative_to(image_dir).with_suffix("").as_posix())
        if mpath is None:
            return Skipped(str(path), "no mask with the same name")
        raw, mraw = _read(path), _read(mpath)
        if isinstance(raw, Skipped) or isinstance(mraw, Skipped):
            return raw if isinstance(raw, Skipped) else mraw
        return Sample(rel, raw, split, mask=mraw, path=str(path))

    def finalize(max_id: int) -> list[str]:
        return names if names else [f"class_{i}" for i in range(max_id + 1)]

    return Source("segmentation", names or [], info={"images": str(image_dir), "masks": str(mask_dir)},
                  finalize=finalize, refs=images, load=load)


# ---------------------------------------------------------------------------------------------- webdataset
def tar_samples(tar_path: Path, read: bool = True):
    """(key, {ext: bytes, or the TarInfo when not ``read``}) per WebDataset sample of a tar, in order, in one
    streaming pass (members of a sample are consecutive and share the name up to the first dot). ``tar_path``: a
    local path or an object store URI (streamed, never downloaded whole)."""
    from vitray import storage

    with contextlib.ExitStack() as stack:
        if storage.is_uri(str(tar_path)):
            raw = stack.enter_context(storage.open_input(str(tar_path)))
            tf = stack.enter_context(tarfile.open(fileobj=raw, mode="r|*"))
        else:
            tf = stack.enter_context(tarfile.open(tar_path, "r|*"))
        key, parts = None, {}
        for member in tf:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            prefix = member.name[: len(member.name) - len(base)]
            k, _, ext = base.partition(".")
            k = prefix + k
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            parts[ext.lower()] = tf.extractfile(member).read() if read else member
        if key is not None:
            yield key, parts


def webdataset(src: Path) -> Source:
    tars = [src] if src.is_file() else sorted(src.glob("*.tar")) if src.is_dir() else []
    if not tars:
        raise SourceError(f"{src}: no .tar shards found (--format webdataset expects a .tar or a folder of them)")
    names = _class_file(src if src.is_dir() else src.parent)

    def groups(tar_path: Path):
        try:
            yield from tar_samples(tar_path)
        except (tarfile.TarError, OSError, EOFError) as err:
            yield None, {"__error__": f"unreadable tar: {err}"}

    def items():
        for tar_path in tars:
            split = next((s for s in SPLIT_NAMES if tar_path.name.startswith(s)), None)
            for key, parts in groups(tar_path):
                if key is None:
                    yield Skipped(str(tar_path), parts["__error__"])
                    continue
                sid = f"{tar_path.stem}/{key}"
                image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff") if e in parts), None)
                if image_ext is None:
                    yield Skipped(f"{tar_path}:{key}", f"no image member (has: {', '.join(sorted(parts)) or 'nothing'})")
                    continue
                label_raw = next((parts[e] for e in ("cls", "cls.txt", "label", "label.txt") if e in parts), None)
                try:
                    label = int(label_raw.decode().strip()) if label_raw is not None else None
                except ValueError:
                    yield Skipped(f"{tar_path}:{key}", f"label is not an integer: {label_raw[:20]!r}")
                    continue
                if label is None:
                    yield Skipped(f"{tar_path}:{key}", "no class label member (.cls)")
                    continue
                yield Sample(sid, parts[image_ext], split, label=label, path=f"{tar_path}:{key}.{image_ext}")

    def finalize(max_id: int) -> list[str]:
        return names if names else [str(i) for i in range(max_id + 1)]

    return Source("classification", names or [], items(), {"tars": [str(t) for t in tars]}, finalize,
                  size_hint=sum(t.stat().st_size for t in tars))


# ------------------------------------------------------------------------------------------ sklearn-digits
def sklearn_digits() -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the package: no download), as 8x8 PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()

    def load(i: int) -> Sample:
        pixels = np.clip(np.rint(digits.images[i] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        return Sample(f"digits-{i:04d}", _png(pixels), None, label=int(digits.target[i]), path=f"sklearn:digits[{i}]")

    return Source("classification", [str(i) for i in range(10)], info={"dataset": "sklearn.datasets.load_digits"},
                  refs=list(range(len(digits.target))), load=load)


def open_source(fmt: str, src: str, *, task: str | None = None, images: str | None = None,
                masks_dir: str | None = None) -> Source:
    if fmt not in SOURCE_FORMATS:
        raise SourceError(f"unknown format {fmt!r}; one of: {', '.join(SOURCE_FORMATS)}")
    if fmt == "sklearn-digits":
        return sklearn_digits()
    path = Path(src).expanduser()
    if not path.exists():
        raise SourceError(f"{path}: source not found")
    if fmt == "imagefolder":
        return imagefolder(path)
    if fmt == "coco":
        return coco(path, Path(images).expanduser() if images else None, task or COCO_DEFAULT_TASK)
    if fmt == "masks":
        return masks(path, Path(masks_dir).expanduser() if masks_dir else None)
    return webdataset(path)
