"""Classification training: cross-entropy with label smoothing, Mixup/CutMix, DeiT distillation from a frozen
teacher (hard labels through the distillation token for DeiT-distilled students, soft KD otherwise); top-1/top-5,
a confusion matrix and a grid of val predictions."""
from __future__ import annotations

import json
import logging
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vitray.data.transforms import make_mixup
from vitray.train.tasks import CONFUSION_MAX_CLASSES, Metric, Task

__all__ = ["TRAINING", "ClassificationTask", "ClassificationMetric"]

log = logging.getLogger("vitray.train")


class ClassificationMetric(Metric):
    def __init__(self, task, pictures=0):
        super().__init__(task, pictures)
        self.sums: torch.Tensor | None = None  # loss_sum, correct1, correct5, count (float64)
        self.confusion: torch.Tensor | None = None
        self.samples: list[tuple] = []

    def update(self, logits, batch):
        y = batch["label"]
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        if self.keep:
            c = logits.shape[1]
            if c <= CONFUSION_MAX_CLASSES:  # c x c counts: an ImageNet-21k matrix would be gigabytes per batch
                counts = torch.bincount(y * c + topk[:, 0], minlength=c * c).view(c, c)
                self.confusion = counts if self.confusion is None else self.confusion + counts
            have = sum(len(s[0]) for s in self.samples)
            if have < self.keep:
                n = self.keep - have
                probs = torch.softmax(logits[:n], dim=-1).max(dim=1).values
                self.samples.append((batch["image"][:n].cpu(), y[:n].cpu(), topk[:n, 0].cpu(), probs.cpu()))
        sums = torch.stack([F.cross_entropy(logits, y, reduction="sum").double(),
                            (topk[:, 0] == y).sum().double(), (topk == y[:, None]).any(dim=1).sum().double(),
                            torch.tensor(float(len(y)), dtype=torch.float64, device=logits.device)])
        self.sums = sums if self.sums is None else self.sums + sums

    def sync(self, reduce, gather=None):
        self.sums = reduce(self.sums if self.sums is not None else torch.zeros(4, dtype=torch.float64))
        c = self.task.num_classes
        if self.keep and c <= CONFUSION_MAX_CLASSES:  # every rank joins, even one with no val rows
            counts = self.confusion if self.confusion is not None else torch.zeros(c, c, dtype=torch.int64)
            self.confusion = reduce(counts.double()).round().long().cpu()

    def compute(self):
        loss_sum, c1, c5, n = self.sums.tolist()
        n = max(n, 1.0)
        return {"val/loss": loss_sum / n, "val/top1": c1 / n, "val/top5": c5 / n}

    def pictures(self, is_rank0):
        if not self.keep or not is_rank0:
            return {}
        from vitray.tracking.figures import confusion_matrix_image, prediction_grid_image

        names = list(self.task.class_names)
        out = {}
        if self.confusion is not None:
            counts = self.confusion.numpy()
            # drawn later, by the tracking logger's thread: rendering costs the training loop nothing
            out["pictures/confusion_matrix.png"] = partial(confusion_matrix_image, counts, names,
                                                           self.task.cfg.model.name)
            out["pictures/confusion_matrix.json"] = json.dumps({"class_names": names,
                                                                "rows_true_cols_predicted": counts.tolist()})
        if self.samples:
            images, labels, preds, probs = (torch.cat(t).numpy() for t in zip(*self.samples))
            out["pictures/val_predictions.png"] = partial(prediction_grid_image, images, labels, preds, probs, names,
                                                          "val: true → predicted")
        return out


class ClassificationTask(Task):
    name = "classification"

    def __init__(self, cfg, class_names):
        super().__init__(cfg, class_names)
        self.teacher: nn.Module | None = None
        self.distill_kind: str | None = None
        self.mixup = None

    def build_model(self, checkpoint: str | None = None) -> nn.Module:
        model = super().build_model(checkpoint)
        if self.cfg.train.linear_probe:  # MAE's linear probing: only the (BatchNorm +) linear head learns
            for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("head."))
            if not (checkpoint or self.cfg.model.checkpoint):
                log.warning("vitray: train.linear_probe without model.checkpoint probes a randomly initialised "
                            "backbone")
        if self.cfg.train.distillation.teacher and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # DeiT-distilled: training forward returns (cls, dist) logits
        return model

    def build_teacher(self, path: str) -> nn.Module:
        """A weights file with ``teacher_model`` (or the student's architecture), or an export folder (a resolved
        ``models:/`` URI), which carries its own architecture."""
        from pathlib import Path

        from vitray.models import create_model
        from vitray.models.export import EXPORT_META, load_export

        if Path(path).is_dir() and (Path(path) / EXPORT_META).is_file():
            teacher, meta = load_export(path)
            if meta["task"] != self.name:
                raise ValueError(f"teacher {path} is a {meta['task']} model; a classifier is needed")
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
    def eval_outputs(self, model, batch, dtype):
        out = model(self.inputs(batch, dtype))
        out = (out[0] + out[1]) / 2 if isinstance(out, tuple) else out  # DeiT: average both heads at eval
        return out.float()

    def metric(self, pictures=0):
        return ClassificationMetric(self, pictures)


TRAINING = ClassificationTask
