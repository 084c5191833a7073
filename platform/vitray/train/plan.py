"""The arithmetic of a run, derived once from the config and the dataset size: batch sizes, the lr scaling rule,
steps per epoch, total and warmup steps. Shared by the driver (progress, ETA) and every worker."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["TrainPlan", "make_plan"]


@dataclass(frozen=True)
class TrainPlan:
    micro_batch: int          # per worker, per forward
    grad_accum: int
    num_workers: int
    global_batch: int         # micro_batch x grad_accum x num_workers: images per optimizer step
    lr: float                 # peak lr after the scaling rule
    lr_rule: str              # how lr was derived, spelled out for logs and MLflow
    train_rows: int
    steps_per_epoch: int      # optimizer steps
    micro_steps_per_epoch: int  # per worker
    total_steps: int
    epochs: int
    warmup_steps: int

    def as_dict(self) -> dict:
        return asdict(self)


def make_plan(cfg, train_rows: int) -> TrainPlan:
    micro, accum, workers = cfg.data.batch_size, cfg.deepspeed.grad_accum, cfg.cluster.num_workers
    global_batch = micro * accum * workers
    rows_per_worker = train_rows // workers
    micro_steps = rows_per_worker // micro  # drop_last: every worker runs exactly this many forwards
    steps_per_epoch = micro_steps // accum
    if steps_per_epoch < 1:
        raise ValueError(f"the train split has {train_rows} images: fewer than one optimizer step of {global_batch} "
                         f"(data.batch_size {micro} x deepspeed.grad_accum {accum} x cluster.num_workers {workers})")
    total = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    base, ref, rule = cfg.train.lr, cfg.train.lr_base_batch_size, cfg.train.lr_scaling
    factor = {"none": 1.0, "linear": global_batch / ref, "sqrt": math.sqrt(global_batch / ref)}[rule]
    lr_rule = f"lr = {base:g} x " + {"none": "1 (no scaling)", "linear": f"{global_batch}/{ref} (linear)",
                                       "sqrt": f"sqrt({global_batch}/{ref}) (sqrt)"}[rule] + f" = {base * factor:.6g}"
    warmup = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else round(cfg.train.warmup_epochs * steps_per_epoch)
    return TrainPlan(micro, accum, workers, global_batch, base * factor, lr_rule, train_rows, steps_per_epoch,
                     steps_per_epoch * accum, total, epochs, min(warmup, total))
