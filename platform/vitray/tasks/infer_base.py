"""What every inference head shares: turning the task's eval transform into the model input, and PNG helpers."""
from __future__ import annotations

import io

import numpy as np

__all__ = ["eval_input", "png_bytes"]


def eval_input(rgb: np.ndarray, meta: dict, codec) -> np.ndarray:
    """(H, W, 3) uint8 -> the (3, S, S) uint8 model input: the task's eval transform, as validation applies it."""
    pre = meta["preprocessing"]
    t = codec.eval_transform(int(pre["img_size"]), pre["crop_pct"], pre["interpolation"])
    return np.ascontiguousarray(t(rgb)[0].transpose(2, 0, 1))


def png_bytes(mask: np.ndarray) -> bytes:
    """A (H, W) uint8 class-index mask as a single-channel PNG (what `vitray data pack --format masks` reads)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), "L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
