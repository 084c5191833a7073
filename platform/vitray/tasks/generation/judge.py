"""How generated images are judged: a classifier of the platform (a registered model or an export) says whether a
sample shows what its prompt asked for (``val/cond_acc``), and its pooled features give the Frechet distance
between generated and real images (``val/fd``: FID's formula in that classifier's features, so it is comparable
only between runs judged by the same classifier, never with published FID)."""
from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Judge", "prompted_class", "Moments", "frechet_distance"]

_ONE_ITEM = re.compile(r"^(?:a|an) (?:small |large )?(?P<name>.+?)(?: (?:at|in) the [a-z ]+)?$")


def prompted_class(caption: str, names: list[str]) -> int | None:
    """The class a one-item caption asks for ("a 7", "an apple", "a large 7 at the top left"), as an index into
    ``names``; None for other captions (several items, unknown names)."""
    m = _ONE_ITEM.match(caption.strip())
    if not m:
        return None
    try:
        return names.index(m.group("name"))
    except ValueError:
        return None


class Judge:
    """A classifier export in eval mode: ``judge(images)`` -> (pooled features, logits) for uint8 (N, C, H, W)."""

    def __init__(self, path: str, device):
        from vitray.models.export import load_export

        self.model, meta = load_export(path, device)
        if not meta.get("class_names") or not hasattr(self.model, "get_classifier"):
            raise ValueError(f"generation.judge: {path} has no class names (a classifier judges samples)")
        self.model.requires_grad_(False)
        self.names = [str(n) for n in meta["class_names"]]
        pre = meta["preprocessing"]
        self.size = int(pre["img_size"])
        self.mean = torch.tensor(pre["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(pre["std"], device=device).view(1, 3, 1, 1) * 255
        self.dtype = next(self.model.parameters()).dtype
        self.dim = int(self.model.num_features)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 255)
        x = ((x - self.mean) / self.std).to(self.dtype)
        feats = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return feats.float(), self.model.get_classifier()(feats).float()


class Moments:
    """Sums for a mean and covariance, all-reducible: n, sum (D,), sum of outer products (D, D), float64."""

    def __init__(self):
        self.n, self.s, self.ss = 0.0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        s, ss = x.sum(0), x.T @ x
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += len(x)

    def packed(self, dim: int, device) -> torch.Tensor:
        if self.s is None:
            return torch.zeros(1 + dim + dim * dim, dtype=torch.float64, device=device)
        return torch.cat([torch.tensor([self.n], dtype=torch.float64, device=self.s.device), self.s, self.ss.flatten()])

    @staticmethod
    def stats(packed: torch.Tensor, dim: int) -> tuple[float, np.ndarray, np.ndarray]:
        p = packed.cpu().numpy()
        n, s, ss = p[0], p[1:1 + dim], p[1 + dim:].reshape(dim, dim)
        mu = s / max(n, 1.0)
        cov = (ss - n * np.outer(mu, mu)) / max(n - 1.0, 1.0)
        return float(n), mu, cov


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2) (FID's formula; the matrix root by scipy)."""
    from scipy import linalg

    covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():  # near-singular product: nudge the diagonals, as the FID reference does
        eps = np.eye(len(cov1)) * 1e-6
        covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))
