"""vitray training: Ray Train V2 workers running DeepSpeed (ZeRO 0-3, bf16/fp16/fp32, accumulation), checkpoints
that resume and survive worker failures, and the export folder that tracking, serving and scoring load."""
from .plan import TrainPlan, make_plan

__all__ = ["TrainPlan", "make_plan", "run_training"]


def run_training(*args, **kwargs):
    from .trainer import run_training as _run

    return _run(*args, **kwargs)
