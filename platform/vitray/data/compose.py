"""``vitray data compose``: scenes with exact masks and boxes, pasted together from a labelled classification set.

Each scene is drawn from its own seeded generator (``seed``, scene index), so the output is the same byte for byte
whatever the thread count:

* background: a smooth random gradient (a 3x3 grid of dark colours, bilinearly upscaled to the canvas) plus mild
  noise; every background channel stays below ``BG_MAX``;
* 1..``max_items`` items, each a source image of a random class (then a random example of that class), resized to a
  random size (longer side between 1/4 and 1/2 of the canvas) and placed at a random position inside the canvas.
  The item's pixels are exactly those where the resized image's intensity is above ``THRESHOLD`` (digits: the ink;
  an image folder: the alpha channel when there is one, else the luminance, inverted when the border is light);
  they are painted in one random bright colour (some channel at least ``ITEM_MIN``), later items on top;
* overlap is capped: a placement that would leave an earlier item with less than ``MIN_VISIBLE`` of its own pixels
  visible is retried elsewhere, and an item that finds no such place within ``PLACE_TRIES`` is dropped, so every
  item keeps at least that share of itself. Masks and boxes describe what is visible;
* with ``held_out_items``, each class's source images are split once (seeded) in the scenes' val share: val scenes
  paste only images that no train scene uses, so a val metric measures items never seen in training.

Written to OUT::

    images/{train,val}/<id>.png   RGB canvases (size x size)
    masks/{train,val}/<id>.png    mode L: 0 background, k+1 an item of class index k
    classes.txt                   "background", then the class names, one per line
    annotations.json              COCO instances: bbox xywh, area = visible pixels, segmentation as uncompressed
                                  RLE (column-major counts; exact, where polygons could not hold a digit's holes),
                                  vitray_source = the index of the pasted image within its class

    captions.json                 with ``captions``: COCO captions (``images``, ``annotations`` of ``{image_id,
                                  caption}``), one caption per scene written from its layout (:func:`caption`)

so that ``vitray data pack OUT ... --format masks`` and ``--format coco`` (segmentation or detection, ``--images
OUT/images``) pack the same labels, and ``vitray data pack OUT/captions.json ... --format coco --task generation``
packs image-caption pairs.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .sources import Skipped, SourceError, imagefolder

__all__ = ["compose", "caption", "ComposeError", "ComposeSummary", "COMPOSE_SOURCES"]

COMPOSE_SOURCES = ("imagefolder", "sklearn-digits")
THRESHOLD = 0.5  # item pixels: resized intensity above this (intensities in [0, 1])
MIN_VISIBLE = 0.3  # an item keeps at least this share of its own pixels visible
PLACE_TRIES = 10
BG_MAX = 0.40  # background channels stay at or below this (before noise) ...
ITEM_MIN = 0.75  # ... items have some channel at or above this
NOISE = 0.03  # +- uniform noise on every pixel
SPLITS = ("train", "val")
OUTPUTS = ("images", "masks", "classes.txt", "annotations.json", "captions.json")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
SMALL, LARGE = 0.32, 0.42  # an item's longer visible side over the canvas: below is "small", above "large"
COUNTS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class ComposeError(SourceError):
    """Bad options or an unusable source: exit 2, the message names the option or file."""


@dataclass
class ComposeSummary:
    out: str
    classes: list[str]
    counts: dict[str, int]  # scenes per split
    items: int  # annotations written
    seconds: float
    paths: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- sources
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    names = [str(i) for i in range(10)]
    by_class = [[img / 16.0 for img, t in zip(d.images, d.target) if t == c] for c in range(10)]
    return names, [lambda j, c=c: by_class[c][j] for c in range(10)], [len(b) for b in by_class]


def _intensity(data: bytes, path: str) -> np.ndarray:
    """(H, W) float in [0, 1]: the alpha channel when the image has one, else luminance (inverted when light-bordered)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:  # noqa: BLE001
        raise ComposeError(f"{path}: not a readable image ({str(err)[:80]})") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        return np.asarray(img.convert("RGBA"), dtype=np.float32)[..., 3] / 255.0
    a = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return 1.0 - a if border.mean() > 0.5 else a


def _folder(src: str):
    source = imagefolder(Path(src).expanduser())
    by_class: list[list] = [[] for _ in source.class_names]
    for ref in source.refs:
        by_class[ref[2]].append(ref)

    def loader(c):
        def load(j):
            sample = source.load(by_class[c][j])
            if isinstance(sample, Skipped):
                raise ComposeError(f"{sample.path}: {sample.reason}")
            return _intensity(sample.data, sample.path)
        return load

    return source.class_names, [loader(c) for c in range(len(by_class))], [len(b) for b in by_class]


def _pick(names: list[str], loaders: list, counts: list[int], classes: str | list[str] | None):
    """Keep the classes asked for (in the source's order) that have at least one image."""
    if classes:
        wanted = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else map(str, classes))]
        wanted = [c for c in wanted if c]
        unknown = [c for c in wanted if c not in names]
        if unknown or not wanted:
            raise ComposeError(f"--classes {','.join(wanted)}: no class named {', '.join(unknown) or '(none given)'} "
                               f"(the source has: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''})")
        keep = [i for i, n in enumerate(names) if n in wanted]
    else:
        keep = list(range(len(names)))
    keep = [i for i in keep if counts[i] > 0]
    if not keep:
        raise ComposeError("the source has no images in the classes asked for")
    return [names[i] for i in keep], [loaders[i] for i in keep], [counts[i] for i in keep]


# ------------------------------------------------------------------------------------------------- drawing
def _resize(a: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize so that the longer side is ``side``, then the item's pixels (bool)."""
    from PIL import Image

    h, w = a.shape
    th, tw = (side, max(1, round(side * w / h))) if h >= w else (max(1, round(side * h / w)), side)
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), "F").resize((tw, th), Image.BILINEAR)
    return np.asarray(img) > THRESHOLD


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    from PIL import Image

    grid = rng.uniform(0.02, BG_MAX, (3, 3, 3)).astype(np.float32)
    chans = [np.asarray(Image.fromarray(grid[..., c], "F").resize((size, size), Image.BILINEAR)) for c in range(3)]
    return np.stack(chans, axis=-1)


def _colour(rng: np.random.Generator) -> np.ndarray:
    import colorsys

    h, s, v = rng.uniform(0, 1), rng.uniform(0.4, 1.0), rng.uniform(ITEM_MIN + NOISE, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _rle(m: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = m.ravel(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] + counts) if flat[0] else counts, "size": [int(m.shape[0]), int(m.shape[1])]}


def _png(a: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def _scene(rng: np.random.Generator, size: int, max_items: int, shape_of, pools: list[np.ndarray]):
    """One layout: (instance map: 0 or j+1 for item j, [(class index, full pixel count, source image index)])."""
    lo, hi = max(4, round(size / 4)), max(4, round(size / 2))
    inst = np.zeros((size, size), dtype=np.uint8)
    items: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(1, max_items + 1))):
        c = int(rng.integers(len(pools)))
        j = int(pools[c][rng.integers(len(pools[c]))])
        shape = shape_of(c, j, int(rng.integers(lo, hi + 1)))
        h, w = shape.shape
        full = int(shape.sum())
        if full == 0:
            continue
        for _ in range(PLACE_TRIES):
            y, x = int(rng.integers(size - h + 1)), int(rng.integers(size - w + 1))
            new = inst.copy()
            new[y:y + h, x:x + w][shape] = len(items) + 1
            seen = np.bincount(new.ravel(), minlength=len(items) + 2)
            if all(seen[k + 1] >= MIN_VISIBLE * f for k, (_, f, _) in enumerate(items)):
                inst = new
                items.append((c, full, j))
                break
    return inst, items


# ------------------------------------------------------------------------------------------------- captions
def _article(name: str) -> str:
    return "an" if name[:1].lower() in "aeio8" or name in ("11", "18") else "a"


def _where(cx: float, cy: float, size: int) -> str:
    """The cell of a 3x3 grid the point falls in: "at the top left", "in the centre", "at the right", ..."""
    row, col = ROWS[min(2, int(3 * cy / size))], COLS[min(2, int(3 * cx / size))]
    if row == "middle" and col == "centre":
        return "in the centre"
    return f"at the {row}" if col == "centre" else f"at the {col}" if row == "middle" else f"at the {row} {col}"


def caption(items: list[tuple[str, list[float]]], size: int) -> str:
    """One sentence from a layout: ``items`` are (class name, visible box x, y, w, h), in drawing order.

    What, how many, where (a 3x3 grid of the canvas, by the box centre) and how big (the box's longer side:
    "small" under SMALL of the canvas, "large" over LARGE): "a large 7 at the top left", "two items: a 3 in the
    centre and a small 0 at the bottom right"."""
    phrases = []
    for name, (x, y, w, h) in items:
        side = max(w, h) / size
        how = "small " if side < SMALL else "large " if side > LARGE else ""
        phrases.append(f"{_article(how or name)} {how}{name} {_where(x + w / 2, y + h / 2, size)}")
    if len(phrases) <= 1:
        return phrases[0] if phrases else "an empty background"
    count = COUNTS[len(phrases) - 1] if len(phrases) <= len(COUNTS) else str(len(phrases))
    return f"{count} items: {', '.join(phrases[:-1])} and {phrases[-1]}"


# ---------------------------------------------------------------------------------------------------- main
def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ComposeError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ComposeError(f"{out}: not empty; pass --overwrite to replace a composed set")
        for name in OUTPUTS:  # only what compose writes: never a user's other files
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if any(out.iterdir()):
            raise ComposeError(f"{out}: holds files compose did not write; choose an empty folder")
    for kind in ("images", "masks"):
        for split in SPLITS:
            (out / kind / split).mkdir(parents=True, exist_ok=True)


def compose(src: str, out: str, *, source: str = "imagefolder", classes: str | list[str] | None = None,
            n: int = 600, size: int = 64, max_items: int = 3, val_fraction: float = 0.2, seed: int = 0,
            overwrite: bool = False, workers: int | None = None, held_out_items: bool = False,
            captions: bool = False) -> ComposeSummary:
    t0 = time.perf_counter()
    if source not in COMPOSE_SOURCES:
        raise ComposeError(f"--from {source}: one of {', '.join(COMPOSE_SOURCES)}")
    for ok, what in ((n >= 1, f"--n {n}: at least 1"), (size >= 16, f"--size {size}: at least 16 pixels"),
                     (max_items >= 1, f"--max-items {max_items}: at least 1"),
                     (0.0 <= val_fraction < 1.0, f"--val-fraction {val_fraction}: must be in [0, 1)")):
        if not ok:
            raise ComposeError(what)
    if source == "imagefolder" and src == "-":
        raise ComposeError("SRC -: give an image folder (SRC/CLASS/IMAGE), or --from sklearn-digits")
    names, loaders, counts = _pick(*(_digits() if source == "sklearn-digits" else _folder(src)), classes)
    out_path = Path(out).expanduser()
    _prepare_out(out_path, overwrite)

    image_of = lru_cache(maxsize=4096)(lambda c, j: loaders[c](j))
    shape_of = lru_cache(maxsize=16384)(lambda c, j, side: _resize(image_of(c, j), side))
    val = set(np.random.default_rng(seed).permutation(n)[:round(n * val_fraction)].tolist())
    pools = {s: [np.arange(k) for k in counts] for s in SPLITS}  # the source images each split's scenes may paste
    if held_out_items:
        for c, k in enumerate(counts):
            if k < 2:
                raise ComposeError(f"--held-out-items: class {names[c]!r} has {k} image(s); at least 2 are needed")
            order = np.random.default_rng([seed, 1, c]).permutation(k)
            cut = min(k - 1, max(1, round(k * val_fraction)))
            pools["val"][c], pools["train"][c] = np.sort(order[:cut]), np.sort(order[cut:])

    def make(i: int):
        rng = np.random.default_rng([seed, i])
        split = "val" if i in val else "train"
        inst, items = _scene(rng, size, max_items, shape_of, pools[split])
        rgb = _background(rng, size)
        lookup = np.zeros(len(items) + 1, dtype=np.uint8)
        for j, (c, _, _) in enumerate(items):
            rgb[inst == j + 1] = _colour(rng)
            lookup[j + 1] = c + 1
        rgb += rng.uniform(-NOISE, NOISE, rgb.shape).astype(np.float32)
        rel = f"{split}/{i + 1:06d}.png"
        (out_path / "images" / rel).write_bytes(_png(np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB"))
        (out_path / "masks" / rel).write_bytes(_png(lookup[inst], "L"))
        anns = []
        for j, (c, _, src) in enumerate(items):
            m = inst == j + 1
            ys, xs = np.nonzero(m)
            x0, y0 = int(xs.min()), int(ys.min())
            anns.append({"image_id": i + 1, "category_id": c + 1, "iscrowd": 0, "area": int(m.sum()),
                         "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1], "segmentation": _rle(m),
                         "vitray_source": src})
        return {"id": i + 1, "file_name": rel, "width": size, "height": size}, split, anns

    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        scenes = list(pool.map(make, range(n)))
    images, annotations = [], []
    for image, _, anns in scenes:
        images.append(image)
        annotations += [{"id": len(annotations) + k + 1, **a} for k, a in enumerate(anns)]
    coco = {"info": {"description": f"vitray data compose ({source}, seed {seed})"}, "images": images,
            "annotations": annotations, "categories": [{"id": k + 1, "name": nm} for k, nm in enumerate(names)]}
    (out_path / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
    (out_path / "classes.txt").write_text("\n".join(["background", *names]) + "\n")
    paths = {k: str(out_path / k) for k in OUTPUTS[:4]}
    if captions:
        by_image: dict[int, list] = {}
        for a in annotations:
            by_image.setdefault(a["image_id"], []).append((names[a["category_id"] - 1], a["bbox"]))
        records = [{"id": im["id"], "image_id": im["id"], "caption": caption(by_image.get(im["id"], []), size)}
                   for im in images]
        (out_path / "captions.json").write_text(json.dumps(
            {"info": {"description": f"vitray data compose --captions ({source}, seed {seed})"}, "images": images,
             "annotations": records}, separators=(",", ":")))
        paths["captions.json"] = str(out_path / "captions.json")
    split_counts = {s: sum(1 for _, sp, _ in scenes if sp == s) for s in SPLITS}
    return ComposeSummary(str(out_path), names, split_counts, len(annotations), time.perf_counter() - t0, paths)
