"""The one list of tasks vitray knows, and what each can do.

A task is a name (stored in the shard manifest and in every export) plus one module per layer:

* ``data``  its shard columns and how a row is decoded and transformed with the pixels (numpy/PIL only);
* ``train`` its training module: model builder, loss, and evaluation with a metric object that syncs across workers;
* ``model`` how its architecture is written into an export and built back from it;
* ``infer`` its inference head: prepare (image -> tensor + geometry), postprocess (outputs -> answers on the original
  image), and its outputs: score columns, the MLflow pyfunc frame, the HTTP route's parameters and response.

This module is torch-free (config validation reads it); a layer's module is imported only when asked for, so a
serving image never imports the training module. Generic code looks a task up here by name and never branches on it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

__all__ = ["TaskInfo", "TaskError", "TASKS", "LAYERS", "get_task", "task_names"]

LAYERS = ("data", "train", "model", "infer")
_WHAT = {"data": "packed and streamed", "train": "trained", "model": "exported", "infer": "served or scored"}


class TaskError(ValueError):
    """An unknown task, or a task asked for a layer it does not have yet."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    summary: str
    primary_metric: str            # what the promotion gate and checkpoint scoring default to
    mode: str                      # "max" or "min" for primary_metric
    primary_label: str             # how people write it ("top-1", "mIoU")
    columns: tuple[str, ...]       # shard columns beside id/image/width/height/split
    route: str | None = None       # HTTP route of its answers
    options: str | None = None     # the config section of its own options (``RunConfig.<options>``)
    demo: tuple[str, str] | None = None  # `vitray quickstart --task`: (embedded config file, demo dataset)
    pictures: str = "pictures"     # what its runs draw into MLflow, as the quickstart names it
    labelled: bool = True          # trains on labels; False: on the images of any pack, labels ignored
    probes: bool = False           # ``train.linear_probe`` applies (a linear head on a frozen backbone)
    card: str = ""                 # the registered model version's description: what the model is and is not
    reads: tuple[str, ...] = ()    # other tasks' packs it trains on (their class names kept)
    ema_decay: float | None = None  # EMA of weights on by default (train.ema not given) with this decay
    inputs: str = "image"          # what its model answers: "image" (an image in) or "prompt" (a text prompt in)
    layers: dict[str, str] = field(default_factory=dict)  # layer -> "module:attribute"

    def has(self, layer: str) -> bool:
        return layer in self.layers

    def load(self, layer: str):
        """The layer's object (imported now). Raises :class:`TaskError` when the task has no such layer yet."""
        if layer not in self.layers:
            can = ", ".join(_WHAT[x] for x in LAYERS if x in self.layers) or "nothing yet"
            raise TaskError(f"task {self.name!r} cannot be {_WHAT.get(layer, layer)} yet (it can be: {can})")
        module, _, attr = self.layers[layer].partition(":")
        return getattr(importlib.import_module(module), attr)


def _layers(task: str, *names: str) -> dict[str, str]:
    objects = {"data": "CODEC", "train": "TRAINING", "model": "ARCHITECTURE", "infer": "HEAD"}
    return {n: f"vitray.tasks.{task}.{n}:{objects[n]}" for n in names}


TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    TaskInfo("classification", "one label per image", "val/top1", "max", "top-1", ("label",), "/v1/classify",
             demo=("quickstart.yaml", "digits"), pictures="confusion matrix", probes=True,
             card="An image classifier: class probabilities of the centre crop.",
             layers=_layers("classification", *LAYERS)),
    TaskInfo("segmentation", "a class per pixel", "val/miou", "max", "mIoU", ("mask",), "/v1/segment",
             options="segmentation", demo=("quickstart-segmentation.yaml", "digit-scenes"),
             pictures="predicted masks", card="A semantic segmenter: a class per pixel of the original image.",
             layers=_layers("segmentation", *LAYERS)),
    TaskInfo("detection", "boxes with labels", "val/map", "max", "mAP", ("boxes", "box_labels", "box_crowd"),
             "/v1/detect", options="detection", demo=("quickstart-detection.yaml", "digit-scenes-coco"),
             pictures="predicted boxes", card="An object detector: labelled boxes in the original image's pixels.",
             layers=_layers("detection", *LAYERS)),
    TaskInfo("mae", "masked-autoencoder pretraining on unlabeled images", "val/recon_loss", "min",
             "reconstruction loss", (), "/v1/embed", options="mae", pictures="reconstructions", labelled=False,
             card="A ViT encoder pretrained as a masked autoencoder (MAE): a backbone, not a classifier. Its pyfunc, "
                  "route and `vitray score` return pooled embeddings; fine-tune it with model.checkpoint set to this "
                  "model's URI (classification, segmentation, detection), or probe it with train.linear_probe.",
             layers=_layers("mae", *LAYERS)),
    TaskInfo("generation", "an image from a caption (diffusion transformer)", "val/loss", "min", "flow loss",
             ("caption",), "/v1/generate", options="generation", pictures="generated samples",
             reads=("classification",),
             ema_decay=0.999, inputs="prompt",
             card="A diffusion transformer (DiT, rectified flow) that draws an image for a caption; not a "
                  "classifier. Sample it with `vitray generate`.",
             layers=_layers("generation", *LAYERS)),
)}


def task_names(layer: str | None = None) -> list[str]:
    """Every task name, or those that have ``layer``."""
    return [n for n, t in TASKS.items() if layer is None or t.has(layer)]


def get_task(name: str, layer: str | None = None) -> TaskInfo:
    """The task called ``name``; with ``layer``, also check that it has that layer."""
    info = TASKS.get(name)
    if info is None:
        raise TaskError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    if layer is not None and not info.has(layer):
        info.load(layer)  # raises the message that says what the task can do
    return info
