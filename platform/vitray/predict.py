"""Inference on an exported model in one process: encoded bytes (or decoded arrays) in, answers about the original
image out (class probabilities, a mask at the original size, ...).

The one preprocessing path for everything that is not training: the MLflow pyfunc, Ray Serve replicas and batch
scoring wrap a :class:`Predictor`. What is task-specific (how an image becomes the model's input and its geometry,
how outputs map back onto the original image) is the task's inference head (``vitray.tasks.<task>.infer``), found by
the task name in the export. Needs ``vitray.models`` and ``vitray.data`` decode/transforms only (no Ray, no
DeepSpeed). The model runs on one of two runtimes: PyTorch (an export's weights, any device and precision), or ONNX
Runtime on CPU (an ONNX export, :mod:`vitray.onnx_runtime`): then torch is never imported, and the task's head gets
numpy outputs (a head that post-processes with torch, ``numpy_outputs = False``, gets them as a CPU tensor).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from vitray.config import MAX_PIXELS
from vitray.data.decode import DecodeError, decode_image

__all__ = ["Predictor", "prepare", "normalise", "normalise_numpy", "decode_item", "evaluate_export", "export_metrics",
           "InputError", "resolve_precision", "head_of", "RUNTIMES"]

PRECISIONS = ("fp32", "bf16", "fp16")  # torch dtypes by name
RUNTIMES = ("torch", "onnx")


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device="cpu", runtime: str = "torch") -> str:
    """``auto`` -> ``bf16`` where the hardware computes in bf16 natively (a CUDA GPU with bf16, a CPU with AMX or
    AVX512-BF16: about 3.5x fp32 for a ViT on these), else ``fp32`` (bf16 emulated on an older CPU is slower).
    The onnx runtime has fp32 (``auto``) and int8 graphs."""
    if runtime == "onnx":
        from vitray.onnx_runtime import onnx_precision

        return onnx_precision(precision)
    if precision != "auto":
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16 with the torch runtime, got {precision!r}")
        return precision
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"  # Ampere or newer
    return "bf16" if dev.type == "cpu" and _cpu_has_native_bf16() else "fp32"


class InputError(ValueError):
    """An input the caller must fix (undecodable bytes, wrong array shape): the message names the item."""


def _is_embedding(head) -> bool:
    from vitray.tasks.embedding import EmbeddingHead

    return isinstance(head, EmbeddingHead)


def decode_item(item, max_pixels: int | None) -> np.ndarray:
    """Encoded bytes or a decoded array -> (H, W, 3) uint8 RGB at full size (as the val pipeline decodes).
    Raises :class:`vitray.data.decode.DecodeError` or :class:`InputError`."""
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


def head_of(meta: dict):
    """The inference head of an export's task."""
    from vitray.tasks import get_task

    return get_task(meta["task"], "infer").load("infer")


def prepare(item, meta: dict, max_pixels: int | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """One encoded image (or decoded uint8 array) -> (the uint8 (3, S, S) input the model sees, the original
    (height, width)): decode at full size, then the task's eval transform (the one validation uses). The expensive,
    per-image half of preprocessing; serving runs it outside the batch."""
    rgb = decode_item(item, max_pixels)
    return head_of(meta).prepare(rgb, meta), rgb.shape[:2]


def normalise_numpy(crops: list[np.ndarray] | np.ndarray, meta: dict) -> np.ndarray:
    """:func:`normalise` in numpy (the onnx runtime): uint8 (N, 3, S, S) -> float32 (x - mean) / std."""
    pre = meta["preprocessing"]
    x = np.stack(crops) if isinstance(crops, list) else np.asarray(crops)
    mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1) * 255
    std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1) * 255
    return (x.astype(np.float32) - mean) / std


def normalise(crops: list[np.ndarray] | np.ndarray, meta: dict, device=None):
    """uint8 (N, 3, S, S) crops -> the normalised float batch (the cheap, batched half of preprocessing). With a
    ``device``, the uint8 batch moves there first and is normalised there: a quarter of the bytes over PCIe and no
    float32 pass on the host CPU, which would otherwise starve a GPU."""
    import torch

    pre = meta["preprocessing"]
    x = torch.from_numpy(np.ascontiguousarray(np.stack(crops) if isinstance(crops, list) else crops))
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.float()
    mean = torch.tensor(pre["mean"], device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre["std"], device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std


class Predictor:
    """An exported model ready for inference. ``predict(images)`` -> one answer per image (the task head's: class
    probabilities, a class-index mask at the original size, ...); ``frame(images)`` the MLflow pyfunc's DataFrame."""

    def __init__(self, model, meta: dict, device="cpu", precision: str = "fp32", max_pixels: int | None = MAX_PIXELS,
                 outputs: str = "task"):
        """``model``: a torch module, or an :class:`vitray.onnx_runtime.OnnxModel` (runs on CPU, in the precision
        of its graph). ``outputs``: ``task``, the answers of the export's task; ``embedding``, the pooled features of
        its ViT encoder (``vitray embed``; :mod:`vitray.tasks.embedding`)."""
        self.meta = meta
        self.head = head_of(meta)
        if getattr(self.head, "inputs", "image") != "image":
            raise InputError(f"a {meta['task']} model takes {self.head.inputs}s, not images: sample it with "
                             f"`vitray generate`, its POST route or its MLflow pyfunc")
        self.runtime = getattr(model, "runtime", "torch")
        if outputs == "embedding":
            from vitray.tasks.embedding import embedder, embedding_head_of

            if self.runtime != "torch" and not _is_embedding(self.head):
                raise InputError(f"embeddings of a {meta['task']} model need the torch runtime (its ONNX graph ends "
                                 "at the task's outputs)")
            if self.runtime == "torch":
                model = embedder(model)
            self.head = embedding_head_of(self.head)
        elif outputs != "task":
            raise ValueError(f"outputs must be 'task' or 'embedding', got {outputs!r}")
        if self.runtime == "torch":
            import torch

            self.device = torch.device(device)
            self.model = model.to(self.device).eval()
            self.precision = resolve_precision(precision, self.device)
            self.dtype = _dtype(self.precision)
        else:
            self.device, self.model, self.precision, self.dtype = "cpu", model, model.precision, None
        self.task = meta["task"]
        self.class_names = list(meta.get("class_names") or [])
        self.max_pixels = max_pixels

    @classmethod
    def from_export(cls, folder: str | Path, runtime: str = "torch", threads: int | None = None, **kw) -> "Predictor":
        """The export in ``folder`` on ``runtime``: ``torch`` (its weights) or ``onnx`` (its ONNX graph; ``threads``
        are ONNX Runtime's)."""
        if runtime == "onnx":
            from vitray.onnx_runtime import OnnxModel

            kw.pop("device", None)
            model = OnnxModel(folder, kw.pop("precision", "auto"), threads=threads)
            return cls(model, model.meta, **kw)
        if runtime != "torch":
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        from vitray.models.export import load_export

        model, meta = load_export(folder)
        return cls(model, meta, **kw)

    @property
    def input_size(self) -> int:
        return int(self.meta["preprocessing"]["img_size"])

    def prepare(self, item) -> tuple[np.ndarray, tuple[int, int]]:
        """Decode + the eval transform of one image (raises DecodeError/InputError): see :func:`prepare`."""
        rgb = decode_item(item, self.max_pixels)
        return self.head.prepare(rgb, self.meta), rgb.shape[:2]

    def prepare_all(self, images: list) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """:meth:`prepare` over a list; a bad item raises :class:`InputError` naming its index."""
        crops, sizes = [], []
        for i, item in enumerate(images):
            try:
                crop, size = self.prepare(item)
            except InputError as err:
                raise InputError(f"image {i}: {err}") from None
            except DecodeError as err:
                raise InputError(f"image {i}: cannot decode ({err})") from None
            crops.append(crop)
            sizes.append(size)
        return crops, sizes

    def forward(self, crops):
        """uint8 crops from :meth:`prepare` (or an already normalised float batch) -> the model's float32 outputs:
        a tensor on the model's device (torch runtime), a numpy array (onnx runtime)."""
        if self.runtime != "torch":
            x = np.asarray(crops)
            return self.model(x if x.dtype.kind == "f" else normalise_numpy(x, self.meta))
        import torch

        with torch.no_grad():
            if isinstance(crops, torch.Tensor) and crops.is_floating_point():
                x = crops.to(self.device)
            else:
                x = normalise(crops.numpy() if isinstance(crops, torch.Tensor) else crops, self.meta, self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                return self.model(x).float()

    def _postprocess(self, outputs, sizes):
        if isinstance(outputs, np.ndarray) and not getattr(self.head, "numpy_outputs", False):
            import torch  # a head that post-processes with torch (resize, NMS): a CPU tensor of the ONNX outputs

            outputs = torch.from_numpy(outputs)
        if self.runtime == "torch":
            import torch

            with torch.no_grad():
                return self.head.postprocess(outputs, sizes, self.meta)
        return self.head.postprocess(outputs, sizes, self.meta)

    def predict_crops(self, crops, sizes: list[tuple[int, int]]) -> list:
        """Prepared crops and their images' original (height, width) -> one answer per image."""
        if not len(sizes):
            return []
        return self._postprocess(self.forward(crops), sizes)

    def predict(self, images: list) -> list:
        crops, sizes = self.prepare_all(images)
        return self.predict_crops(crops, sizes)

    def frame(self, images: list):
        """The MLflow pyfunc's output: one row per image (the task head's columns)."""
        crops, sizes = self.prepare_all(images)
        return self.head.frame(self.predict_crops(crops, sizes), sizes, self.meta)

    # for classifiers: the answers are probability rows, read here as one (N, classes) array
    def probabilities(self, images: list) -> np.ndarray:
        results = self.predict(images)
        return np.stack(results) if len(results) else np.zeros((0, len(self.class_names)), dtype=np.float32)

    def probabilities_of_crops(self, crops) -> np.ndarray:
        return np.asarray(self._postprocess(self.forward(crops), None))

    def label_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


def evaluate_export(model, meta: dict, shards: str, split: str = "val", batch_size: int = 256) -> tuple[float, int]:
    """(the task's primary metric, images) of an exported model over one split: see :func:`export_metrics`."""
    from vitray.tasks import get_task

    metrics, n = export_metrics(model, meta, shards, split, batch_size)
    return metrics[get_task(meta["task"]).primary_metric], n


def export_metrics(model, meta: dict, shards: str, split: str = "val", batch_size: int = 256) -> tuple[dict, int]:
    """The val metrics of an exported model over one split of packed shards, in one process, no Ray: rows decoded
    by the val pipeline's own function, outputs scored by the task's training metric (``val/top1``, ``val/miou``,
    ...). ``model``: a torch module or an ONNX graph (:class:`vitray.onnx_runtime.OnnxModel`). Returns (metrics,
    images)."""
    import pyarrow.parquet as pq
    import torch

    from vitray.config import RunConfig, parse_config
    from vitray.data.formats import Manifest
    from vitray.data.pipeline import EVAL_MAX_BOXES, decode_batch, read_columns
    from vitray.train.tasks import build_task

    task = meta["task"]
    names = list(meta.get("class_names") or [])
    pre = meta["preprocessing"]
    from vitray.tasks import get_task

    section = get_task(task).options  # the task's options the export kept (decode settings, ...)
    fields = RunConfig.model_fields[section].annotation.model_fields if section else {}
    options = {k: v for k, v in meta["model"].items() if k in fields}
    cfg = parse_config({"model": {"name": meta["model"]["name"], "num_classes": len(names),
                                  "img_size": meta["model"].get("img_size")}, "train": {"task": task},
                        **({section: options} if section else {})})
    metric = build_task(cfg, names).metric()
    predictor = Predictor(model, meta)
    m = Manifest.read(shards)
    n = 0
    for f in m.files(shards, split):
        table = pq.read_table(f, columns=read_columns(task, [f]))
        for i in range(0, table.num_rows, batch_size):
            rows = {k: v.to_pylist() for k, v in zip(table.column_names, table.slice(i, batch_size).columns)}
            batch = decode_batch(rows, task=task, train=False, img_size=int(pre["img_size"]),
                                 transforms={"crop_pct": pre["crop_pct"]}, max_pixels=predictor.max_pixels,
                                 max_boxes=EVAL_MAX_BOXES, interpolation=pre["interpolation"])
            ok = batch.pop("ok")
            batch = {k: torch.from_numpy(v[ok]) for k, v in batch.items()}
            with torch.no_grad():
                metric.update(torch.as_tensor(predictor.forward(batch["image"].numpy())), batch)
            n += int(ok.sum())
    metric.sync(lambda t: t, lambda obj: [obj])
    return metric.compute(), n
