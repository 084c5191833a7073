"""Plain single-process inference over packed shards with an exported model: the reference that Ray-based paths
(training eval, serving, scoring) are checked against."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from vitray.data.decode import decode_image
from vitray.data.formats import Manifest
from vitray.data.transforms import EvalTransform

__all__ = ["preprocess", "evaluate_export"]


def preprocess(images: list[bytes], meta: dict, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded images -> the normalised float batch an exported model expects (its own preprocessing)."""
    pre = meta["preprocessing"]
    t = EvalTransform(pre["img_size"], crop_pct=pre["crop_pct"], interpolation=pre["interpolation"])
    arr = np.stack([t(decode_image(b, max_pixels))[0].transpose(2, 0, 1) for b in images])
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    mean = torch.tensor(pre["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre["std"]).view(1, 3, 1, 1) * 255
    return (x - mean) / std


@torch.no_grad()
def evaluate_export(model, meta: dict, shards: str, split: str = "val", batch_size: int = 256) -> tuple[float, int]:
    m = Manifest.read(shards)
    correct = n = 0
    for f in m.files(shards, split):
        table = pq.read_table(f, columns=["image", "label"])
        images, labels = table.column("image").to_pylist(), np.asarray(table.column("label"))
        for i in range(0, len(images), batch_size):
            pred = model(preprocess(images[i:i + batch_size], meta)).argmax(1).numpy()
            correct += int((pred == labels[i:i + batch_size]).sum())
            n += len(pred)
    return correct / max(n, 1), n
