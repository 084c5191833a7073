"""Test images made on the spot (nothing is downloaded): encoded bytes in every mode and format the packer meets."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(seed: int, size=(24, 20)) -> Image.Image:
    """A deterministic RGB picture (w, h) = size with smooth structure, so JPEG round trips stay recognisable."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    arr = np.stack([(base[c] + 3 * xx * (c + 1) + 2 * yy) % 256 for c in range(3)], -1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_imagefolder(root: Path, classes=("cat", "dog", "eel"), per_class=6, splits=False, fmt="PNG") -> dict[str, bytes]:
    """Returns {relative id: bytes} of every image written."""
    written = {}
    for s in (["train", "val"] if splits else [None]):
        for ci, c in enumerate(classes):
            d = root / s / c if s else root / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                data = encode(rgb(ci * 100 + i + (1000 if s == "val" else 0)), fmt)
                p = d / f"{c}_{i:03d}.{fmt.lower().replace('jpeg', 'jpg')}"
                p.write_bytes(data)
                written[p.relative_to(root).as_posix()] = data
    return written


def make_coco(root: Path, n_images=4) -> dict:
    """A COCO instances file: each image has one rectangle (box + polygon), one RLE object, one crowd object."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    images, anns = [], []
    aid = 1
    for i in range(n_images):
        w, h = 40, 30
        (img_dir / f"im{i}.png").write_bytes(encode(rgb(i, (w, h))))
        images.append({"id": i + 10, "file_name": f"im{i}.png", "width": w, "height": h})
        x0, y0, x1, y1 = 5 + i, 4, 20 + i, 16
        anns.append({"id": aid, "image_id": i + 10, "category_id": 3, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        aid += 1
        # uncompressed RLE: rows 20..24 of columns 30..34 (column-major runs)
        m = np.zeros((h, w), np.uint8)
        m[20:25, 30:35] = 1
        flat = m.T.reshape(-1)
        counts, val, run = [], 0, 0
        for v in flat:
            if v != val:
                counts.append(run)
                run, val = 0, v
            run += 1
        counts.append(run)
        anns.append({"id": aid, "image_id": i + 10, "category_id": 7, "bbox": [30, 20, 5, 5], "area": 25, "iscrowd": 0,
                     "segmentation": {"size": [h, w], "counts": counts}})
        aid += 1
        anns.append({"id": aid, "image_id": i + 10, "category_id": 7, "bbox": [0, 26, 4, 4], "area": 16, "iscrowd": 1,
                     "segmentation": [[0, 26, 4, 26, 4, 30, 0, 30]]})
        aid += 1
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "boat"}, {"id": 3, "name": "person"}]}
    (root / "instances.json").write_text(json.dumps(data))
    return data


def make_masks(root: Path, n=5) -> dict[str, tuple[bytes, bytes]]:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    out = {}
    for i in range(n):
        img = encode(rgb(i, (32, 24)))
        m = np.zeros((24, 32), np.uint8)
        m[4:12, 6:20] = 1 + i % 2
        m[0, :] = 255
        mask = encode(Image.fromarray(m, "L"))
        (root / "images" / f"s{i}.png").write_bytes(img)
        (root / "masks" / f"s{i}.png").write_bytes(mask)
        out[f"s{i}.png"] = (img, mask)
    (root / "classes.txt").write_text("background\nroad\ncar\n")
    return out


def make_webdataset(root: Path, n_per_tar=5, tars=("train-000", "val-000")) -> dict[str, tuple[bytes, int]]:
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for t, name in enumerate(tars):
        with tarfile.open(root / f"{name}.tar", "w") as tf:
            for i in range(n_per_tar):
                key = f"sample{i:04d}"
                data = encode(rgb(t * 50 + i), "JPEG", quality=90)
                label = (i + t) % 3
                for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                out[f"{name}/{key}"] = (data, label)
    return out


def digits_images():
    """scikit-learn's bundled digits (real handwriting, shipped in the package) as 8-bit grayscale arrays, labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8), d.target.astype(int)


def make_digits_folder(root: Path, sizes=(8, 16, 24, 32), bad: int = 3) -> dict[str, int]:
    """The digits laid out as people keep an image folder: ROOT/CLASS/*.png, so sorted by class; mixed sizes (each
    image upscaled to one of ``sizes``), and ``bad`` corrupt files (a truncated PNG, a text file, an empty file).
    Returns {relative path: label} of the good images."""
    images, labels = digits_images()
    out = {}
    for i, (img, label) in enumerate(zip(images, labels)):
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        s = sizes[i % len(sizes)]
        path = d / f"digit_{i:04d}.png"
        path.write_bytes(encode(Image.fromarray(img, "L").resize((s, s), Image.NEAREST)))
        out[path.relative_to(root).as_posix()] = int(label)
    corrupt = [encode(Image.fromarray(images[0], "L"))[:40], b"not an image\n", b""]
    for k in range(bad):
        (root / str(k % 10) / f"broken_{k}.png").write_bytes(corrupt[k % 3])
    return out
