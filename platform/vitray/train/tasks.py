"""What the training loop asks of a task, so every task plugs in without touching the loop.

A task (``vitray.tasks.<name>.train``, found through the registry by ``train.task``) builds its model, turns a batch
into a loss, and evaluates through a :class:`Metric`: each rank updates it with its own val batches, then
:meth:`Metric.sync` all-reduces what it accumulated (sums, counts, confusion matrices: never a mean of means; or
gathers what cannot be summed, such as detections) and
:meth:`Metric.compute` turns that into the ``val/...`` metrics, the same on every rank.
"""
from __future__ import annotations

import torch
from torch import nn

from vitray.data.transforms import normalize_batch

__all__ = ["Task", "Metric", "build_task", "CONFUSION_MAX_CLASSES"]

CONFUSION_MAX_CLASSES = 200  # above this a confusion matrix is neither legible nor cheap: only the grid is logged


class Metric:
    """Evaluation state of one pass. ``pictures`` > 0 asks it to keep that many example images from this rank."""

    def __init__(self, task: "Task", pictures: int = 0):
        self.task, self.keep = task, pictures

    def update(self, outputs: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def sync(self, reduce, gather=None) -> None:
        """``reduce(tensor)`` sums a tensor over all workers; ``gather(obj)`` returns every worker's ``obj`` (a list
        in rank order; for what cannot be summed, such as detections evaluated once over the whole split). Both are
        collectives: every rank calls ``sync`` exactly once."""
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    def pictures(self, is_rank0: bool) -> dict:
        """After :meth:`sync`: ``{artifact file: PIL image, a function drawing one, or JSON text for .json files}``
        on rank 0 (functions are called off the training thread)."""
        return {}


class Task:
    """Interface of a training task. Batches are dicts of tensors from the data pipeline (already filtered of rows
    that failed to decode); ``images`` is the normalised float input in the model's dtype."""

    name = "task"

    def __init__(self, cfg, class_names: list[str]):
        self.cfg, self.class_names = cfg, class_names
        self.num_classes = cfg.model.num_classes
        if class_names and len(class_names) != self.num_classes:
            raise ValueError(f"model.num_classes is {self.num_classes} but the dataset has {len(class_names)} classes "
                             f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")

    def build_model(self, checkpoint: str | None = None) -> nn.Module:
        """The model to train; ``checkpoint`` (a local file or export folder) initialises it."""
        from vitray.tasks import get_task

        return get_task(self.name, "model").load("model").for_training(self.cfg, checkpoint)

    def setup(self, device: torch.device, dtype: torch.dtype, teacher_path: str | None = None) -> None:
        """Called once per worker after the engine exists (teachers, mixing functions, ...)."""

    def inputs(self, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        return normalize_batch(batch["image"], self.cfg.data.mean, self.cfg.data.std).to(dtype)

    def training_loss(self, model: nn.Module, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def eval_outputs(self, model: nn.Module, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        return model(self.inputs(batch, dtype)).float()

    def metric(self, pictures: int = 0) -> Metric:
        raise NotImplementedError


def build_task(cfg, class_names: list[str]) -> Task:
    """The training task of ``train.task`` (looked up in ``vitray.tasks``)."""
    from vitray.tasks import get_task

    return get_task(cfg.train.task, "train").load("train")(cfg, class_names)
