"""Tasks: what the training loop asks of a kind of training, so MAE, detection and segmentation plug in without
touching the loop.

A task builds its model, turns a batch into a loss, and turns eval batches into *sums and counts* that the loop
all-reduces across workers before :meth:`Task.eval_metrics` divides them (never a mean of means).
"""
from __future__ import annotations

import json
import logging

import torch
import torch.nn.functional as F
from torch import nn

from vitray.data.transforms import make_mixup, normalize_batch
from vitray.models import create_model, create_model_from_config

__all__ = ["Task", "ClassificationTask", "build_task", "TASKS", "CONFUSION_MAX_CLASSES"]

CONFUSION_MAX_CLASSES = 200  # above this the confusion matrix is neither legible nor cheap: only the grid is logged

log = logging.getLogger("vitray.train")


class Task:
    """Interface of a training task. Batches are dicts of tensors from the data pipeline (already filtered of rows
    that failed to decode); ``images`` is the normalised float input in the model's dtype."""

    name = "task"
    #: the names of the sums :meth:`eval_sums` returns; the loop all-reduces them in this order
    eval_keys: tuple[str, ...] = ()

    def __init__(self, cfg, class_names: list[str]):
        self.cfg, self.class_names = cfg, class_names

    def build_model(self, checkpoint: str | None = None) -> nn.Module:
        raise NotImplementedError

    def setup(self, device: torch.device, dtype: torch.dtype) -> None:
        """Called once per worker after the engine exists (teachers, mixing functions, ...)."""

    def inputs(self, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        return normalize_batch(batch["image"], self.cfg.data.mean, self.cfg.data.std).to(dtype)

    def training_loss(self, model: nn.Module, batch: dict, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def eval_sums(self, model: nn.Module, batch: dict, dtype: torch.dtype) -> dict[str, float]:
        raise NotImplementedError

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def begin_eval(self, pictures: int) -> None:
        """Before an eval pass: ``pictures`` > 0 asks the task to keep what :meth:`eval_pictures` draws (that many
        example images from this rank, plus whatever it aggregates)."""

    def eval_pictures(self, reduce, is_rank0: bool) -> dict:
        """After an eval pass that kept pictures: ``{artifact file: PIL image, a function drawing one, or JSON text
        for ``.json`` files}`` on rank 0
        (functions are called off the training thread). ``reduce(tensor)``
        sums a tensor over all workers (a collective: every rank calls this)."""
        return {}


class ClassificationTask(Task):
    """Supervised classification: label smoothing, Mixup/CutMix, and DeiT distillation from a frozen teacher
    (hard labels through the distillation token for DeiT-distilled students, soft KD otherwise)."""

    name = "classification"
    eval_keys = ("loss_sum", "correct1", "correct5", "count")

    def __init__(self, cfg, class_names):
        super().__init__(cfg, class_names)
        self.num_classes = cfg.model.num_classes
        if class_names and len(class_names) != self.num_classes:
            raise ValueError(f"model.num_classes is {self.num_classes} but the dataset has {len(class_names)} classes "
                             f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''})")
        self.teacher: nn.Module | None = None
        self.distill_kind: str | None = None
        self.mixup = None

    def build_model(self, checkpoint: str | None = None) -> nn.Module:
        model = create_model_from_config(self.cfg.model, checkpoint=checkpoint)
        if self.cfg.train.distillation.teacher and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # DeiT-distilled: training forward returns (cls, dist) logits
        return model

    def build_teacher(self, path: str) -> nn.Module:
        """A weights file with ``teacher_model`` (or the student's architecture), or an export folder (a resolved
        ``models:/`` URI), which carries its own architecture."""
        from pathlib import Path

        from vitray.models.export import EXPORT_META, load_export

        if Path(path).is_dir() and (Path(path) / EXPORT_META).is_file():
            teacher, meta = load_export(path)
            if meta["model"]["num_classes"] != self.num_classes:
                raise ValueError(f"teacher {path} has {meta['model']['num_classes']} classes, the student {self.num_classes}")
        else:
            d = self.cfg.train.distillation
            name = d.teacher_model or self.cfg.model.name
            teacher = create_model(name, num_classes=self.num_classes, img_size=self.cfg.model.img_size, checkpoint=path)
        teacher.requires_grad_(False)
        return teacher.eval()

    def setup(self, device, dtype, teacher_path: str | None = None):
        d = self.cfg.train.distillation
        if d.teacher:
            self.teacher = self.build_teacher(teacher_path or d.teacher).to(device)
            self.distill_kind = d.kind if d.kind != "auto" else ("hard" if self.cfg.model.name.startswith("deit") and
                                                                 "distilled" in self.cfg.model.name else "soft")
            log.info("distillation: %s, teacher %s (frozen, eval mode)", self.distill_kind, d.teacher)
        self.mixup = make_mixup(self.cfg.data.mixup, self.cfg.data.cutmix, self.num_classes,
                                self.cfg.train.label_smoothing, self.cfg.data.mix_prob, self.cfg.data.switch_prob)
        self.dtype = dtype

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()  # never trained, never in train mode (dropout / drop path off)
        with torch.no_grad():
            return self.teacher(x.to(next(self.teacher.parameters()).dtype)).float()

    def training_loss(self, model, batch, dtype):
        x = self.inputs(batch, torch.float32)
        y = batch["label"]
        target = None
        if self.mixup is not None and x.shape[0] % 2 == 0:
            x, target = self.mixup(x, y)  # soft targets with label smoothing folded in
        out = model(x.to(dtype))
        out_cls, out_dist = (out if isinstance(out, tuple) else (out, None))
        out_cls = out_cls.float()
        if target is not None:
            base = torch.sum(-target * F.log_softmax(out_cls, dim=-1), dim=-1).mean()
        else:
            base = F.cross_entropy(out_cls, y, label_smoothing=self.cfg.train.label_smoothing)
        if self.teacher is None:
            return base
        t_logits = self._teacher_logits(x)
        alpha, tau = self.cfg.train.distillation.alpha, self.cfg.train.distillation.tau
        student = out_dist.float() if out_dist is not None else out_cls
        if self.distill_kind == "hard":
            distill = F.cross_entropy(student, t_logits.argmax(dim=-1))
        else:
            distill = F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(t_logits / tau, dim=-1),
                               reduction="batchmean", log_target=True) * tau * tau
        return (1 - alpha) * base + alpha * distill

    @torch.no_grad()
    def _logits(self, model, batch, dtype):
        out = model(self.inputs(batch, dtype))
        return (out[0] + out[1]) / 2 if isinstance(out, tuple) else out  # DeiT: average both heads at eval

    def begin_eval(self, pictures: int) -> None:
        self._keep = pictures
        self._confusion = None
        self._samples: list[tuple] = []

    @torch.no_grad()
    def eval_sums(self, model, batch, dtype):
        logits = self._logits(model, batch, dtype).float()
        y = batch["label"]
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        if getattr(self, "_keep", 0):
            c = logits.shape[1]
            if c <= CONFUSION_MAX_CLASSES:  # c x c counts: an ImageNet-21k matrix would be gigabytes per batch
                counts = torch.bincount(y * c + topk[:, 0], minlength=c * c).view(c, c)
                self._confusion = counts if self._confusion is None else self._confusion + counts
            have = sum(len(s[0]) for s in self._samples)
            if have < self._keep:
                n = self._keep - have
                probs = torch.softmax(logits[:n], dim=-1).max(dim=1).values
                self._samples.append((batch["image"][:n].cpu(), y[:n].cpu(), topk[:n, 0].cpu(), probs.cpu()))
        return {
            "loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
            "correct1": float((topk[:, 0] == y).sum()),
            "correct5": float((topk == y[:, None]).any(dim=1).sum()),
            "count": float(len(y)),
        }

    def eval_metrics(self, sums):
        n = max(sums["count"], 1.0)
        return {"val/loss": sums["loss_sum"] / n, "val/top1": sums["correct1"] / n, "val/top5": sums["correct5"] / n}

    def eval_pictures(self, reduce, is_rank0):
        if not getattr(self, "_keep", 0):
            return {}
        from functools import partial

        from vitray.tracking.figures import confusion_matrix_image, prediction_grid_image

        c = self.num_classes
        pictures = {}
        if c <= CONFUSION_MAX_CLASSES:
            counts = self._confusion if self._confusion is not None else torch.zeros(c, c, dtype=torch.int64)
            counts = reduce(counts.double()).round().long().cpu().numpy()  # every rank joins, even one with no val rows
            if is_rank0:
                # drawn later, by the tracking logger's thread: rendering costs the training loop nothing
                pictures["pictures/confusion_matrix.png"] = partial(confusion_matrix_image, counts,
                                                                    list(self.class_names), self.cfg.model.name)
                pictures["pictures/confusion_matrix.json"] = json.dumps(
                    {"class_names": list(self.class_names), "rows_true_cols_predicted": counts.tolist()})
        if not is_rank0:
            return {}
        if self._samples:
            images, labels, preds, probs = (torch.cat(t).numpy() for t in zip(*self._samples))
            pictures["pictures/val_predictions.png"] = partial(prediction_grid_image, images, labels, preds, probs,
                                                               list(self.class_names), "val: true → predicted")
        return pictures


TASKS: dict[str, type[Task]] = {"classification": ClassificationTask}


def build_task(cfg, class_names: list[str]) -> Task:
    try:
        return TASKS[cfg.train.task](cfg, class_names)
    except KeyError:
        raise ValueError(f"train.task {cfg.train.task!r} is not available yet (available: {', '.join(TASKS)})") from None
