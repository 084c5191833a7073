"""Per-image transforms on decoded arrays, keeping boxes and masks aligned with the pixels, and batch functions.

Geometric ops (random-resized crop, flip, eval resize + centre crop) move boxes (clipped; those left under a pixel
wide or tall dropped) and
masks (nearest neighbour) with the image. Each crop + resize is one PIL ``resize(box=...)`` call. Images leave
the CPU workers as uint8 (B, 3, H, W) and are normalised on the trainer (:func:`normalize_batch`): a quarter of
the bytes through the object store (measured in benchmarks/data_throughput.py). Mixup/CutMix mix across
samples, so they are batch functions the trainer applies (:func:`make_mixup`).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
    "random_resized_crop_params", "crop_resize", "hflip", "eval_crop_box", "TrainTransform", "EvalTransform",
    "ResizeTransform",
    "normalize_batch", "make_mixup",
]

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
MIN_BOX_SIDE = 1.0  # a box a crop leaves narrower or shorter than a pixel is no object any more: dropped


def random_resized_crop_params(h: int, w: int, scale, ratio, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(left, top, width, height) of a random crop covering ``scale`` of the area with aspect ``ratio`` (the
    Inception / torchvision algorithm: 10 tries, then a centre crop with the ratio clamped)."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return float(rng.integers(0, w - cw + 1)), float(rng.integers(0, h - ch + 1)), float(cw), float(ch)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (w - cw) / 2, (h - ch) / 2, float(cw), float(ch)


def eval_crop_box(h: int, w: int, crop_pct: float) -> tuple[float, float, float, float]:
    """Centre square of side crop_pct x the short side: "resize the short side to size/crop_pct, centre-crop size"."""
    side = min(h, w) * crop_pct
    return (w - side) / 2, (h - side) / 2, side, side


def crop_resize(img: np.ndarray, box, size: tuple[int, int], interpolation: str = "bicubic",
                boxes: np.ndarray | None = None, mask: np.ndarray | None = None):
    """Crop ``box`` = (left, top, width, height) and resize it to ``size`` = (height, width), moving boxes and mask."""
    left, top, cw, ch = box
    out_h, out_w = size
    pil_box = (left, top, left + cw, top + ch)
    out = np.asarray(Image.fromarray(img).resize((out_w, out_h), _RESAMPLE[interpolation], box=pil_box))
    if mask is not None:
        mask = np.asarray(Image.fromarray(mask).resize((out_w, out_h), Image.NEAREST, box=pil_box))
    if boxes is not None and len(boxes):
        sx, sy = out_w / cw, out_h / ch
        b = boxes.astype(np.float32).copy()
        b[:, [0, 2]] = np.clip((b[:, [0, 2]] - left) * sx, 0, out_w)
        b[:, [1, 3]] = np.clip((b[:, [1, 3]] - top) * sy, 0, out_h)
        keep = (b[:, 2] - b[:, 0] >= MIN_BOX_SIDE) & (b[:, 3] - b[:, 1] >= MIN_BOX_SIDE)
        return out, b, keep, mask
    return out, boxes, None, mask


def hflip(img: np.ndarray, boxes: np.ndarray | None = None, mask: np.ndarray | None = None):
    w = img.shape[1]
    img = img[:, ::-1]
    if mask is not None:
        mask = mask[:, ::-1]
    if boxes is not None and len(boxes):
        boxes = boxes.copy()
        boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
    return img, boxes, mask


class TrainTransform:
    """Random-resized crop, horizontal flip, then (classification only) timm's RandAugment; returns HWC uint8."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5,
                 randaugment: str | None = None, interpolation: str = "bicubic", mean=(0.485, 0.456, 0.406),
                 seed: int | None = None):
        self.size = (size, size)
        self.scale, self.ratio, self.hflip_p, self.interpolation = scale, ratio, hflip, interpolation
        self.rng = np.random.default_rng(seed)
        self.randaugment = None
        if randaugment:
            from timm.data.auto_augment import rand_augment_transform

            self.randaugment = rand_augment_transform(randaugment, {"img_mean": tuple(round(255 * m) for m in mean),
                                                                    "translate_const": int(size * 0.45)})

    def __call__(self, img: np.ndarray, boxes: np.ndarray | None = None, labels: np.ndarray | None = None,
                 mask: np.ndarray | None = None):
        h, w = img.shape[:2]
        crop = random_resized_crop_params(h, w, self.scale, self.ratio, self.rng)
        img, boxes, keep, mask = crop_resize(img, crop, self.size, self.interpolation, boxes, mask)
        if keep is not None:
            boxes, labels = boxes[keep], labels[keep]
        if self.hflip_p and self.rng.random() < self.hflip_p:
            img, boxes, mask = hflip(img, boxes, mask)
        if self.randaugment is not None and boxes is None and mask is None:
            img = np.asarray(self.randaugment(Image.fromarray(np.ascontiguousarray(img))))
        return img, boxes, labels, mask


class EvalTransform:
    """Resize the short side to size / crop_pct and centre-crop ``size`` (one resample)."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation: str = "bicubic"):
        self.size, self.crop_pct, self.interpolation = (size, size), crop_pct, interpolation

    def __call__(self, img: np.ndarray, boxes=None, labels=None, mask=None):
        h, w = img.shape[:2]
        img, boxes, keep, mask = crop_resize(img, eval_crop_box(h, w, self.crop_pct), self.size, self.interpolation,
                                             boxes, mask)
        if keep is not None:
            boxes, labels = boxes[keep], labels[keep]
        return img, boxes, labels, mask


class ResizeTransform:
    """The whole image resized to ``size`` x ``size`` (aspect not kept, nothing cropped), masks nearest-neighbour:
    what dense tasks evaluate and infer on, so every original pixel has a prediction to map back to."""

    def __init__(self, size: int, interpolation: str = "bicubic"):
        self.size, self.interpolation = (size, size), interpolation

    def __call__(self, img: np.ndarray, boxes=None, labels=None, mask=None):
        h, w = img.shape[:2]
        img, boxes, keep, mask = crop_resize(img, (0.0, 0.0, float(w), float(h)), self.size, self.interpolation,
                                             boxes, mask)
        if keep is not None:
            boxes, labels = boxes[keep], labels[keep]
        return img, boxes, labels, mask


def normalize_batch(images, mean, std):
    """uint8 (B, 3, H, W) torch tensor -> float32 normalised, on whatever device it is on (the trainer's)."""
    import torch

    m = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return (images.float() - m) / s


def make_mixup(mixup: float, cutmix: float, num_classes: int, label_smoothing: float = 0.0, prob: float = 1.0,
               switch_prob: float = 0.5):
    """timm's batch Mixup/CutMix (soft targets, label smoothing folded in), or None when both alphas are 0.
    Call it on a normalised float batch and int labels: ``x, soft_targets = mix(x, y)``."""
    if mixup <= 0 and cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob, mode="batch",
                 label_smoothing=label_smoothing, num_classes=num_classes)
