"""CenterNet's training targets, loss and decoding (Zhou et al., "Objects as Points", arXiv 1904.07850).

Boxes come as a padded batch: ``boxes`` (B, M, 4) xyxy in input pixels, ``labels`` (B, M) class ids, -1 for padding,
optionally ``crowd`` (B, M) bool. Everything is vectorised over the batch (no per-box Python loop).

* Heatmap target: per object an elliptical Gaussian around its centre cell (sigma = alpha x box side / 6 per axis,
  alpha 0.54 as in TTFNet, arXiv 1909.00700), the maximum where objects of one class overlap; the centre cell is
  exactly 1. Crowd regions (COCO ``iscrowd``) are not objects: no peak, and their cells are left out of the negative
  loss (the detector is neither rewarded nor punished there, as COCO's evaluation ignores them).
* Loss: CenterNet's penalty-reduced focal loss on the heatmap (alpha 2, beta 4; not torchvision's
  ``sigmoid_focal_loss``, which has no Gaussian-reduced negatives), plus L1 on size (weight 0.1) and centre offset
  (weight 1) at the true centres, each normalised by the number of centre peaks (objects; two objects of one class
  centred in the same cell count once).
* Decoding: a peak is a cell equal to the 3x3 max-pool of the heatmap; the top-k peaks over all classes become boxes
  (centre + offset, size), clipped to the image (``torchvision.ops.clip_boxes_to_image``) and, where asked, passed
  through class-wise NMS (``torchvision.ops.batched_nms``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["centernet_targets", "centernet_loss", "centernet_decode", "GAUSSIAN_ALPHA", "SIZE_WEIGHT"]

GAUSSIAN_ALPHA = 0.54
SIZE_WEIGHT = 0.1
OFFSET_WEIGHT = 1.0


def _objects(boxes: torch.Tensor, labels: torch.Tensor, crowd: torch.Tensor | None, stride: int, hw: tuple[int, int]):
    """Valid objects' (batch index, centre cell, centre in cells, size in cells, class), and crowd boxes."""
    valid = labels >= 0
    is_crowd = crowd.bool() & valid if crowd is not None else torch.zeros_like(valid)
    obj = valid & ~is_crowd
    b, m = obj.nonzero(as_tuple=True)
    box = boxes[b, m].float() / stride
    centre = torch.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2], dim=1)
    cell = centre.floor().long()
    cell[:, 0].clamp_(0, hw[1] - 1)
    cell[:, 1].clamp_(0, hw[0] - 1)
    size = torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], dim=1)
    return b, cell, centre, size, labels[b, m].long(), is_crowd


def centernet_targets(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, hw: tuple[int, int], stride: int,
                      crowd: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Heatmap (B, C, H, W) and the ``ignore`` mask of crowd cells (B, 1, H, W), plus per object its batch index,
    centre cell, size (cells) and offset targets."""
    bsz = labels.shape[0]
    h, w = hw
    if len(labels) and int(labels.max()) >= num_classes:
        raise ValueError(f"a box label is {int(labels.max())} but the model has {num_classes} classes "
                         "(model.num_classes must cover the data's box labels)")
    b, cell, centre, size, cls, is_crowd = _objects(boxes, labels, crowd, stride, hw)
    heat = torch.zeros(bsz, num_classes, h, w, device=boxes.device)
    if len(b):
        ys = torch.arange(h, device=boxes.device, dtype=torch.float32).view(1, h, 1)
        xs = torch.arange(w, device=boxes.device, dtype=torch.float32).view(1, 1, w)
        sig = (GAUSSIAN_ALPHA * size / 6).clamp(min=0.25)
        g = torch.exp(-((xs - cell[:, 0].view(-1, 1, 1)) ** 2 / (2 * sig[:, 0].view(-1, 1, 1) ** 2)
                        + (ys - cell[:, 1].view(-1, 1, 1)) ** 2 / (2 * sig[:, 1].view(-1, 1, 1) ** 2)))
        flat = heat.view(bsz * num_classes, h * w)
        index = (b * num_classes + cls).view(-1, 1).expand(-1, h * w)
        flat.scatter_reduce_(0, index, g.view(-1, h * w), reduce="amax")
        heat[b, cls, cell[:, 1], cell[:, 0]] = 1.0
    ignore = torch.zeros(bsz, 1, h, w, dtype=torch.bool, device=boxes.device)
    if is_crowd.any():
        cb, cm = is_crowd.nonzero(as_tuple=True)
        cbox = boxes[cb, cm].float() / stride
        ys = torch.arange(h, device=boxes.device).view(1, h, 1) + 0.5
        xs = torch.arange(w, device=boxes.device).view(1, 1, w) + 0.5
        inside = ((xs >= cbox[:, 0].view(-1, 1, 1)) & (xs <= cbox[:, 2].view(-1, 1, 1))
                  & (ys >= cbox[:, 1].view(-1, 1, 1)) & (ys <= cbox[:, 3].view(-1, 1, 1)))
        hits = torch.zeros(bsz, h * w, device=boxes.device).index_add_(0, cb, inside.view(len(cb), -1).float())
        ignore = (hits > 0).view(bsz, 1, h, w) & (heat.amax(1, keepdim=True) < 1)  # an object's centre still counts
    return {"heat": heat, "ignore": ignore, "b": b, "cell": cell, "size": size, "offset": centre - cell.float()}


def centernet_loss(outputs: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, stride: int,
                   crowd: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of a batch (and its parts, detached) for outputs (B, C + 4, H, W)."""
    c = outputs.shape[1] - 4
    t = centernet_targets(boxes, labels, c, tuple(outputs.shape[-2:]), stride, crowd)
    logits = outputs[:, :c].float()
    heat = t["heat"]
    pos = heat == 1
    n = pos.sum().clamp(min=1).float()
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = logits.sigmoid()
    pos_loss = -((1 - p) ** 2 * log_p)[pos].sum()
    neg_weight = (1 - heat) ** 4 * (~t["ignore"]).float()
    neg_loss = -((p ** 2) * log_not_p * neg_weight)[~pos].sum()
    focal = (pos_loss + neg_loss) / n
    if len(t["b"]):
        at = outputs[t["b"], :, t["cell"][:, 1], t["cell"][:, 0]].float()  # (N, C + 4) at the true centres
        size_loss = F.l1_loss(at[:, c:c + 2], t["size"], reduction="sum") / n
        offset_loss = F.l1_loss(at[:, c + 2:c + 4], t["offset"], reduction="sum") / n
    else:
        size_loss = offset_loss = outputs.sum() * 0.0
    loss = focal + SIZE_WEIGHT * size_loss + OFFSET_WEIGHT * offset_loss
    return loss, {"heatmap": focal.detach(), "size": size_loss.detach(), "offset": offset_loss.detach()}


@torch.no_grad()
def centernet_decode(outputs: torch.Tensor, stride: int, input_hw: tuple[int, int] | None = None, k: int = 100,
                     nms_iou: float | None = None, min_score: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Outputs (B, C + 4, H, W) -> per image (boxes (K, 4) xyxy in input pixels, scores (K,), labels (K,)), best
    first; at most ``k`` per image, none below ``min_score``. ``input_hw``: the model input's size (default: the
    output's times the stride)."""
    from torchvision.ops import batched_nms, clip_boxes_to_image

    outputs = outputs.float()
    bsz, c4, h, w = outputs.shape
    c = c4 - 4
    heat = outputs[:, :c].sigmoid()
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, idx = peaks.reshape(bsz, -1).topk(min(k, c * h * w))
    cls, pos = idx // (h * w), idx % (h * w)
    y, x = (pos // w).float(), (pos % w).float()
    reg = outputs[:, c:].reshape(bsz, 4, h * w)
    gathered = reg.gather(2, pos.unsqueeze(1).expand(-1, 4, -1))  # (B, 4, K)
    bw, bh = gathered[:, 0].clamp(min=0), gathered[:, 1].clamp(min=0)
    cx, cy = x + gathered[:, 2], y + gathered[:, 3]
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1) * stride
    out = []
    for i in range(bsz):
        keep = scores[i] > min_score
        b = clip_boxes_to_image(boxes[i][keep], input_hw or (h * stride, w * stride))
        s, lab = scores[i][keep], cls[i][keep]
        if nms_iou is not None and len(b):
            kept = batched_nms(b, s, lab, nms_iou)  # sorted by score
            b, s, lab = b[kept], s[kept], lab[kept]
        out.append((b, s, lab))
    return out
