"""Segmentation training: per-pixel cross-entropy (255 = ignore); mIoU, per-class IoU and pixel accuracy from one
confusion matrix summed over all workers, and a picture of val images with their true and predicted masks."""
from __future__ import annotations

import json
import re
from functools import partial

import torch
import torch.nn.functional as F

from vitray.data.formats import IGNORE_INDEX
from vitray.train.tasks import Metric, Task

__all__ = ["TRAINING", "SegmentationTask", "SegmentationMetric", "iou_from_confusion"]


def iou_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(per-class IoU, which classes count, pixel accuracy) of a (true, predicted) confusion matrix. A class absent
    from both truth and prediction has no IoU and is left out of the mean."""
    c = confusion.double()
    tp = c.diag()
    union = c.sum(0) + c.sum(1) - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))
    return iou, present, float(tp.sum() / c.sum().clamp(min=1))


def _metric_key(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", name) or "_"


class SegmentationMetric(Metric):
    def __init__(self, task, pictures=0):
        super().__init__(task, pictures)
        c = task.num_classes
        self.confusion = None
        self.loss = None  # (loss sum, pixels)
        self.samples: list[tuple] = []
        self.c = c

    def update(self, logits, batch):
        y = batch["mask"].long()
        pred = logits.argmax(dim=1)
        valid = y != IGNORE_INDEX
        counts = torch.bincount(y[valid] * self.c + pred[valid], minlength=self.c * self.c).view(self.c, self.c)
        self.confusion = counts if self.confusion is None else self.confusion + counts
        loss = torch.stack([F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").double(),
                            valid.sum().double()])
        self.loss = loss if self.loss is None else self.loss + loss
        have = sum(len(s[0]) for s in self.samples)
        if have < self.keep:
            n = self.keep - have
            self.samples.append((batch["image"][:n].cpu(), y[:n].cpu(), pred[:n].cpu()))

    def sync(self, reduce, gather=None):
        zeros = torch.zeros(self.c, self.c, dtype=torch.float64)
        self.confusion = reduce((self.confusion if self.confusion is not None else zeros).double()).round().long().cpu()
        self.loss = reduce(self.loss if self.loss is not None else torch.zeros(2, dtype=torch.float64)).cpu()

    def compute(self):
        iou, present, acc = iou_from_confusion(self.confusion)
        out = {"val/loss": float(self.loss[0] / self.loss[1].clamp(min=1)),
               "val/miou": float(iou[present].mean()) if present.any() else 0.0, "val/pixel_acc": acc}
        for i, name in enumerate(self.task.class_names or [str(i) for i in range(self.c)]):
            if bool(present[i]):
                out[f"val/iou/{_metric_key(name)}"] = float(iou[i])
        return out

    def pictures(self, is_rank0):
        if not self.keep or not is_rank0:
            return {}
        from vitray.tracking.figures import segmentation_grid_image

        names = list(self.task.class_names)
        out = {"pictures/confusion_matrix.json": json.dumps({"class_names": names,
                                                             "rows_true_cols_predicted": self.confusion.tolist()})}
        if self.samples:
            images, truths, preds = (torch.cat(t).numpy() for t in zip(*self.samples))
            out["pictures/val_segmentation.png"] = partial(segmentation_grid_image, images, truths, preds, names,
                                                           "val: image | truth | prediction")
        return out


class SegmentationTask(Task):
    name = "segmentation"

    def training_loss(self, model, batch, dtype):
        logits = model(self.inputs(batch, dtype)).float()
        return F.cross_entropy(logits, batch["mask"].long(), ignore_index=IGNORE_INDEX)

    def metric(self, pictures=0):
        return SegmentationMetric(self, pictures)


TRAINING = SegmentationTask
