"""MAE training: the masked-patch reconstruction loss; evaluation with a fixed masking (the same patches of the same
val images every pass, so ``val/recon_loss`` is comparable across epochs and runs) and a picture of val images with
their masked input and reconstruction."""
from __future__ import annotations

from functools import partial

import torch

from vitray.data.transforms import normalize_batch
from vitray.train.tasks import Metric, Task

__all__ = ["TRAINING", "MaeTask", "MaeMetric", "EVAL_MASK_SEED"]

EVAL_MASK_SEED = 20_211_111  # val masks: drawn from this seed at every pass


def _to_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x * s + m) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


class MaeMetric(Metric):
    def __init__(self, task, pictures=0):
        super().__init__(task, pictures)
        self.sums = None  # (loss sum over images, images) float64
        self.samples: list[tuple] = []

    def update(self, outputs, batch):
        loss, pred, mask = outputs
        sums = torch.stack([loss.double().sum(), torch.tensor(float(len(loss)), dtype=torch.float64,
                                                              device=loss.device)])
        self.sums = sums if self.sums is None else self.sums + sums
        have = sum(len(s[0]) for s in self.samples)
        if have < self.keep:
            n = self.keep - have
            self.samples.append((batch["image"][:n].cpu(), pred[:n].float().cpu(), mask[:n].float().cpu()))

    def sync(self, reduce, gather=None):
        self.sums = reduce(self.sums if self.sums is not None else torch.zeros(2, dtype=torch.float64)).cpu()

    def compute(self):
        loss_sum, n = self.sums.tolist()
        return {"val/recon_loss": loss_sum / max(n, 1.0)}

    def pictures(self, is_rank0):
        if not self.keep or not is_rank0 or not self.samples:
            return {}
        from vitray.models.mae import normalised_targets, patchify, unpatchify
        from vitray.tracking.figures import reconstruction_grid_image

        cfg = self.task.cfg
        images, pred, mask = (torch.cat(t) for t in zip(*self.samples))
        x = normalize_batch(images, cfg.data.mean, cfg.data.std).float()
        chans, size = x.shape[1], x.shape[-1]
        patch = int(round((pred.shape[-1] / chans) ** 0.5))
        grid = (size // patch, size // patch)
        _, stats = normalised_targets(x, patch, cfg.mae.norm_pix_loss)
        recon = pred * stats[1] + stats[0] if stats is not None else pred
        visible = patchify(x, patch)
        keep = (1 - mask)[:, :, None]
        grey = torch.zeros_like(visible)  # the mean colour after normalisation
        as_img = partial(unpatchify, patch=patch, grid=grid, chans=chans)
        pictures = [_to_uint8(as_img(p), cfg.data.mean, cfg.data.std).numpy()
                    for p in (visible, visible * keep + grey * (1 - keep), recon, visible * keep + recon * (1 - keep))]
        return {"pictures/val_reconstructions.png": partial(
            reconstruction_grid_image, *pictures,
            f"val: {cfg.mae.mask_ratio:.0%} of patches masked; loss on masked patches only")}


class MaeTask(Task):
    name = "mae"

    def __init__(self, cfg, class_names):  # labels are never read: any pack's images, any class count
        self.cfg, self.class_names, self.num_classes = cfg, [], 0

    def training_loss(self, model, batch, dtype):
        loss, _, _ = model(self.inputs(batch, dtype))
        return loss.mean()

    @torch.no_grad()
    def eval_outputs(self, model, batch, dtype):
        x = self.inputs(batch, dtype)
        generator = torch.Generator(device=x.device).manual_seed(EVAL_MASK_SEED)
        return model(x, generator=generator)

    def metric(self, pictures=0):
        return MaeMetric(self, pictures)


TRAINING = MaeTask
