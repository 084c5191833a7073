"""The DeepSpeed config generated from the ``deepspeed`` section and the run's batch plan."""
from __future__ import annotations

__all__ = ["deepspeed_config"]


def deepspeed_config(ds, plan, *, load_universal: bool = False) -> dict:
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_bucket_size=5e7, allgather_bucket_size=5e7)
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    cfg = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # keep the torch AdamW under offload: no compiled CPUAdam
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.grad_clip > 0:
        cfg["gradient_clipping"] = ds.grad_clip
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg
