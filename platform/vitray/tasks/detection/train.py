"""Detection training: CenterNet's loss on the simple-pyramid ViT; COCO box mAP over the whole val split.

Each rank decodes its val batches' detections and keeps them with the true boxes, both mapped back to each image's
original pixels. :meth:`DetectionMetric.sync` gathers every rank's lists (detections cannot be summed) and the
evaluation runs once over the full split (``vitray.tasks.detection.evaluate``), on every rank alike, so every rank
reports the same ``val/map``. MLflow gets the COCO stats and a grid of val images with true and predicted boxes.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import torch

from vitray.models.centernet import centernet_decode, centernet_loss
from vitray.tasks.detection.evaluate import coco_stats
from vitray.train.tasks import Metric, Task

__all__ = ["TRAINING", "DetectionTask", "DetectionMetric", "EVAL_MIN_SCORE"]

EVAL_MIN_SCORE = 0.001  # detections below this are not worth evaluating (COCO keeps the best 100 per image anyway)


def _in_original(boxes: np.ndarray, orig_hw, input_hw) -> np.ndarray:
    """Boxes in the model input's pixels -> the original image's (the eval transform resizes the whole image)."""
    sy, sx = orig_hw[0] / input_hw[0], orig_hw[1] / input_hw[1]
    return boxes * np.array([sx, sy, sx, sy], dtype=np.float32)


class DetectionMetric(Metric):
    def __init__(self, task, pictures=0):
        super().__init__(task, pictures)
        self.truths: list = []      # per image: (boxes xyxy, labels, crowd) in original pixels
        self.detections: list = []  # per image: (boxes xyxy, scores, labels) in original pixels
        self.sizes: list = []       # per image: original (height, width)
        self.loss = None            # (loss x images, images)
        self.samples: list = []     # (image, true boxes, detections) in input pixels, for the picture
        self.stats: dict = {}

    def update(self, outputs, batch):
        task = self.task
        input_hw = tuple(batch["image"].shape[-2:])
        dets = centernet_decode(outputs, task.stride, input_hw, k=task.opts.max_detections, nms_iou=task.opts.nms_iou,
                                min_score=EVAL_MIN_SCORE)
        loss, _ = centernet_loss(outputs, batch["boxes"], batch["box_labels"], task.stride, batch.get("box_crowd"))
        n = len(outputs)
        part = torch.stack([loss.detach().double() * n, torch.tensor(float(n), dtype=torch.float64, device=loss.device)])
        self.loss = part if self.loss is None else self.loss + part
        boxes, labels = batch["boxes"].cpu().numpy(), batch["box_labels"].cpu().numpy()
        crowd = batch["box_crowd"].cpu().numpy() if "box_crowd" in batch else np.zeros_like(labels, dtype=bool)
        sizes = batch["orig_size"].cpu().numpy() if "orig_size" in batch else np.tile(input_hw, (n, 1))
        for i, (b, s, lab) in enumerate(dets):
            valid = labels[i] >= 0
            size = tuple(int(v) for v in sizes[i])
            self.truths.append((_in_original(boxes[i][valid], size, input_hw), labels[i][valid], crowd[i][valid]))
            self.detections.append((_in_original(b.cpu().numpy(), size, input_hw), s.cpu().numpy(), lab.cpu().numpy()))
            self.sizes.append(size)
            if len(self.samples) < self.keep:
                self.samples.append((batch["image"][i].cpu().numpy(), boxes[i][valid], labels[i][valid],
                                     b.cpu().numpy(), s.cpu().numpy(), lab.cpu().numpy()))

    def sync(self, reduce, gather=None):
        self.loss = reduce(self.loss if self.loss is not None else torch.zeros(2, dtype=torch.float64)).cpu()
        parts = (gather or (lambda obj: [obj]))((self.truths, self.detections, self.sizes))
        self.truths = [x for p in parts for x in p[0]]
        self.detections = [x for p in parts for x in p[1]]
        self.sizes = [x for p in parts for x in p[2]]

    def compute(self):
        stats = coco_stats(self.truths, self.detections, self.sizes, self.task.num_classes)
        out = {"val/loss": float(self.loss[0] / self.loss[1].clamp(min=1)),
               **{k: max(v, 0.0) for k, v in stats.items() if k in ("val/map", "val/map50", "val/map75")},
               **{k: v for k, v in stats.items() if v >= 0 and k not in ("val/map", "val/map50", "val/map75")}}
        out["val/images"] = float(len(self.sizes))
        return out

    def pictures(self, is_rank0):
        if not self.keep or not is_rank0 or not self.samples:
            return {}
        from vitray.tracking.figures import detection_grid_image

        return {"pictures/val_detections.png": partial(
            detection_grid_image, self.samples, list(self.task.class_names), self.task.opts.score_threshold,
            f"val: true boxes (white) | predicted (score >= {self.task.opts.score_threshold:g})")}


class DetectionTask(Task):
    name = "detection"

    def __init__(self, cfg, class_names):
        super().__init__(cfg, class_names)
        self.opts = cfg.detection
        from vitray.models.detection import pyramid_strides
        from vitray.models.zoo import default_img_size

        self.stride = pyramid_strides(cfg.model.img_size or default_img_size(cfg.model.name))[0]

    def training_loss(self, model, batch, dtype):
        outputs = model(self.inputs(batch, dtype))
        loss, _ = centernet_loss(outputs.float(), batch["boxes"], batch["box_labels"], self.stride,
                                 batch.get("box_crowd"))
        return loss

    def metric(self, pictures=0):
        return DetectionMetric(self, pictures)


TRAINING = DetectionTask
