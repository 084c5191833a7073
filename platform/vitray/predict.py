"""Inference on an exported model in one process: encoded bytes (or decoded arrays) in, class probabilities out.

The one preprocessing path for everything that is not training: the MLflow pyfunc, Ray Serve replicas and batch
scoring wrap a :class:`Predictor`, and the Ray-based paths are checked against :func:`evaluate_export`. Needs
``vitray.models`` and ``vitray.data`` decode/transforms only (no Ray, no DeepSpeed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vitray.data.decode import decode_image
from vitray.data.transforms import EvalTransform

__all__ = ["Predictor", "prepare", "normalise", "preprocess", "evaluate_export", "InputError", "resolve_precision"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """``auto`` -> ``bf16`` where the hardware computes in bf16 natively (a CUDA GPU with bf16, a CPU with AMX or
    AVX512-BF16: about 3.5x fp32 for a ViT on these), else ``fp32`` (bf16 emulated on an older CPU is slower)."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        return precision
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"  # Ampere or newer
    return "bf16" if dev.type == "cpu" and _cpu_has_native_bf16() else "fp32"


class InputError(ValueError):
    """An input the caller must fix (undecodable bytes, wrong array shape): the message names the item."""


def _as_rgb(item, max_pixels: int | None) -> np.ndarray:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(bytes(item), max_pixels)
    arr = np.asarray(item)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise InputError(f"decoded image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype != np.uint8:
        raise InputError(f"decoded image must be uint8 RGB, got {arr.dtype}")
    return np.ascontiguousarray(arr[:, :, :3])


def prepare(item, meta: dict, max_pixels: int | None = None) -> np.ndarray:
    """One encoded image (or decoded uint8 array) -> the uint8 (3, S, S) crop the model sees: decode, resize the
    short side, centre-crop. The expensive, per-image half of preprocessing; serving runs it outside the batch."""
    pre = meta["preprocessing"]
    t = EvalTransform(pre["img_size"], crop_pct=pre["crop_pct"], interpolation=pre["interpolation"])
    return np.ascontiguousarray(t(_as_rgb(item, max_pixels))[0].transpose(2, 0, 1))


def normalise(crops: list[np.ndarray] | np.ndarray, meta: dict, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 (N, 3, S, S) crops -> the normalised float batch (the cheap, batched half of preprocessing). With a
    ``device``, the uint8 batch moves there first and is normalised there: a quarter of the bytes over PCIe and no
    float32 pass on the host CPU, which would otherwise starve a GPU."""
    pre = meta["preprocessing"]
    x = torch.from_numpy(np.ascontiguousarray(np.stack(crops) if isinstance(crops, list) else crops))
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.float()
    mean = torch.tensor(pre["mean"], device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre["std"], device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def preprocess(images: list, meta: dict, max_pixels: int | None = None) -> torch.Tensor:
    """Encoded images (or decoded uint8 arrays) -> the normalised float batch an exported model expects (its own
    preprocessing). A bad item raises :class:`InputError` naming its index."""
    return normalise(prepare_all(images, meta, max_pixels), meta)


def prepare_all(images: list, meta: dict, max_pixels: int | None = None) -> list[np.ndarray]:
    """:func:`prepare` over a list; a bad item raises :class:`InputError` naming its index."""
    out = []
    for i, item in enumerate(images):
        try:
            out.append(prepare(item, meta, max_pixels))
        except InputError as err:
            raise InputError(f"image {i}: {err}") from None
        except Exception as err:  # noqa: BLE001 - DecodeError, PIL errors: name the item, keep the reason
            raise InputError(f"image {i}: cannot decode ({err})") from None
    return out


class Predictor:
    """An exported classification model ready for inference: ``probabilities(images)`` -> (N, classes) float32."""

    def __init__(self, model: torch.nn.Module, meta: dict, device: str | torch.device = "cpu",
                 precision: str = "fp32", max_pixels: int | None = 64_000_000):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.class_names = list(meta.get("class_names") or [])
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.max_pixels = max_pixels

    @classmethod
    def from_export(cls, folder: str | Path, **kw) -> "Predictor":
        from vitray.models.export import load_export

        model, meta = load_export(folder)
        return cls(model, meta, **kw)

    @torch.no_grad()
    def probabilities(self, images: list) -> np.ndarray:
        if not len(images):
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return self.probabilities_of_crops(prepare_all(images, self.meta, self.max_pixels))

    @property
    def input_size(self) -> int:
        return int(self.meta["preprocessing"]["img_size"])

    def prepare(self, item) -> np.ndarray:
        """Decode + resize + crop one image (raises DecodeError/InputError): see :func:`prepare`."""
        return prepare(item, self.meta, self.max_pixels)

    @torch.no_grad()
    def probabilities_of_crops(self, crops) -> np.ndarray:
        """uint8 crops from :meth:`prepare` (or an already normalised float batch) -> (N, classes) probabilities."""
        if isinstance(crops, torch.Tensor) and crops.is_floating_point():
            x = crops.to(self.device)
        else:
            x = normalise(crops.numpy() if isinstance(crops, torch.Tensor) else crops, self.meta, self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=-1).cpu().numpy()

    def label_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


@torch.no_grad()
def evaluate_export(model, meta: dict, shards: str, split: str = "val", batch_size: int = 256) -> tuple[float, int]:
    """Top-1 of an exported model over one split of packed shards, one process, no Ray."""
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

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
