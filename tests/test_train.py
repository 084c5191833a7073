"""Training on a real local Ray instance with 2 CPU workers running the real DeepSpeed engine (gloo)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes import DETERMINISTIC, make_cfg, merge, read_log
from vitray.config import parse_config
from vitray.train.plan import make_plan


def export_weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(result.export_dir) / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ the plan
def test_plan_batch_math_and_lr_rule(digits, tmp_path):
    cfg = make_cfg(digits, tmp_path, deepspeed={"grad_accum": 2}, train={"lr": 1e-3, "lr_base_batch_size": 512})
    plan = make_plan(cfg, 1602)
    assert plan.global_batch == 64 * 2 * 2 == 256
    assert plan.micro_steps_per_epoch == 1602 // 2 // 64 == 12 and plan.steps_per_epoch == 6
    assert plan.lr == pytest.approx(1e-3 * 256 / 512) and "256/512 (linear)" in plan.lr_rule
    assert plan.total_steps == 25 * 6 and plan.warmup_steps == 12
    cfg = make_cfg(digits, tmp_path, train={"steps": 40, "lr_scaling": "sqrt", "lr_base_batch_size": 128})
    plan = make_plan(cfg, 1602)
    assert plan.total_steps == 40 and plan.epochs == 4 and plan.lr == pytest.approx(6e-3)


def test_param_groups_skip_decay_on_norms_biases_tokens():
    from vitray.models import create_model
    from vitray.train.optim import param_groups

    model = create_model("vit_pico_patch4_32", num_classes=10)
    groups = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= decay
    ld = param_groups(model, 0.05, layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in ld})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** 5)  # embeddings: 4 blocks + head below the top


# --------------------------------------------------------------------------------------- distillation
def test_distillation_teacher_frozen_eval_and_reaches_loss(tmp_path):
    from safetensors.torch import save_file

    from vitray.models import create_model
    from vitray.train.tasks import build_task

    torch.manual_seed(0)
    teacher_a = create_model("vit_pico_patch4_32", num_classes=10, drop_path=0.5)
    save_file(teacher_a.state_dict(), str(tmp_path / "a.safetensors"))
    teacher_b = create_model("vit_pico_patch4_32", num_classes=10)
    save_file(teacher_b.state_dict(), str(tmp_path / "b.safetensors"))
    batch = {"image": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 3])}
    losses = {}
    for name in ("a", "b"):
        cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 10},
                            "train": {"distillation": {"teacher": str(tmp_path / f"{name}.safetensors"), "kind": "soft",
                                                       "alpha": 1.0}}})
        task = build_task(cfg, [str(i) for i in range(10)])
        task.setup(torch.device("cpu"), torch.float32)
        torch.manual_seed(1)
        student = task.build_model()
        task.teacher.train()  # even if someone flips it, the task evaluates it in eval mode
        loss = task.training_loss(student, batch, torch.float32)
        assert not task.teacher.training and all(not p.requires_grad for p in task.teacher.parameters())
        loss.backward()
        assert all(p.grad is None for p in task.teacher.parameters())
        assert student.head.weight.grad.abs().sum() > 0
        losses[name] = float(loss.detach())
    assert losses["a"] != pytest.approx(losses["b"])  # the teacher's outputs reach the loss


def test_hard_distillation_uses_distillation_token(tmp_path):
    from vitray.models import create_model
    from vitray.train.tasks import build_task

    teacher = create_model("vit_pico_patch4_32", num_classes=5)
    torch.save(teacher.state_dict(), tmp_path / "t.pth")
    cfg = parse_config({"model": {"name": "deit_tiny_distilled_patch16_224", "num_classes": 5, "img_size": 32},
                        "train": {"distillation": {"teacher": str(tmp_path / "t.pth"), "teacher_model": "vit_pico_patch4_32",
                                                   "alpha": 1.0}}})
    task = build_task(cfg, [str(i) for i in range(5)])
    task.setup(torch.device("cpu"), torch.float32)
    assert task.distill_kind == "hard"
    student = task.build_model()
    loss = task.training_loss(student, {"image": torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "label": torch.tensor([0, 1])},
                              torch.float32)
    loss.backward()
    assert student.head_dist.weight.grad.abs().sum() > 0  # alpha=1: only the distillation head learns
    assert student.head.weight.grad is None or student.head.weight.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------- ZeRO equivalence
def _zero_stages_loop(config):
    """Ray Train worker: the same model, data and seed through vitray's engine factory at each ZeRO stage."""
    import ray.train
    import torch.distributed as dist
    import torch.nn.functional as F

    from vitray.models import create_model
    from vitray.train.loop import _prepare_cpu_deepspeed, build_engine, optimizer_state_norms
    from vitray.train.plan import TrainPlan

    _prepare_cpu_deepspeed()
    rank = ray.train.get_context().get_world_rank()
    g = torch.Generator().manual_seed(100 + rank)
    xs = torch.randn(config["steps"], 16, 3, 32, 32, generator=g)
    ys = torch.randint(0, 10, (config["steps"], 16), generator=g)
    out = {}
    for stage in (0, 1, 2, 3):
        cfg = parse_config({"model": {"name": "vit_pico_patch4_32"}, "data": {"batch_size": 16},
                            "train": {"lr": 1e-3, "lr_scaling": "none", "warmup_steps": 2},
                            "deepspeed": {"zero_stage": stage}})
        plan = TrainPlan(16, 1, 2, 32, 1e-3, "", 640, 20, 20, config["steps"], 1, 2)
        torch.manual_seed(0)
        engine, _ = build_engine(cfg, plan, create_model("vit_pico_patch4_32", num_classes=10))
        losses = []
        for i in range(config["steps"]):
            loss = F.cross_entropy(engine(xs[i % 4]), ys[i % 4])  # 4 batches cycled: learnable
            engine.backward(loss)
            engine.step()
            t = loss.detach().clone()
            dist.all_reduce(t)
            losses.append(float(t) / 2)
        out[stage] = {"losses": losses, **optimizer_state_norms(engine)}
        del engine
    if rank == 0:
        Path(config["out"]).write_text(json.dumps(out))


@pytest.mark.slow
def test_zero_stages_same_losses_and_partitioned_state(ray_cluster, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(_zero_stages_loop, train_loop_config={"steps": 20, "out": str(tmp_path / "zero.json")},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           torch_config=TorchConfig(backend="gloo"),
                           run_config=RunConfig(name="zero", storage_path=str(tmp_path),
                                                worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}))
    trainer.fit()
    res = json.loads((tmp_path / "zero.json").read_text())
    base = np.array(res["0"]["losses"])
    assert base[-1] < base[0]  # it trains
    for stage in ("1", "2", "3"):
        # fp32 throughout; ZeRO changes only the order of the gradient reductions (bucketed reduce-scatter vs one
        # all-reduce), i.e. float32 rounding (~1e-7 relative per step); 1e-4 absolute bounds 20 Adam steps of it
        np.testing.assert_allclose(res[stage]["losses"], base, atol=1e-4, rtol=0)
    full = res["0"]["moments_numel"]
    for stage in ("1", "2"):
        ratio = res[stage]["moments_numel"] / full
        assert 0.45 <= ratio <= 0.55, (stage, ratio)  # each of 2 ranks holds about half of the Adam moments


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_worker_killed_mid_epoch_resumes_without_repeats_or_gaps(ray_cluster, digits, tmp_path, monkeypatch):
    from vitray.train import run_training

    marker = tmp_path / "killed"
    monkeypatch.setenv("VITRAY_TEST_KILL_AT_STEP", "8")
    monkeypatch.setenv("VITRAY_TEST_KILL_MARKER", str(marker))
    cfg = make_cfg(digits, tmp_path, train={"epochs": 1, "log_every_steps": 1, "checkpoint_every_steps": 5},
                   cluster={"max_failures": 1, "run_name": "ft"},
                   tracking={"enabled": True, "flush_interval_s": 1.0})  # the embedded store under this test's home
    result = run_training(cfg)
    assert marker.read_text() == "8"  # the hook really killed a worker at step 8
    assert result.metrics["step"] == 12  # 1 epoch x 12 optimizer steps: exactly the configured number
    log = read_log(result.run_dir)
    resumed = [i for i, r in enumerate(log) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and log[resumed[0]]["step"] == 5  # restarted from the step-5 checkpoint
    after = [r["step"] for r in log[resumed[0] + 1:] if "train/loss" in r]
    assert after == list(range(6, 13))  # neither repeats nor skips
    before = [r["step"] for r in log[:resumed[0]] if "train/loss" in r]
    assert before == list(range(1, 9))  # the killed attempt got to step 8; steps 6-8 were redone from the checkpoint
    # MLflow: the restarted workers kept logging into the same run, which ends FINISHED with every step
    from vitray.tracking import default_tracking_uri
    from vitray.tracking.uris import client_for

    client = client_for(default_tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("vitray").experiment_id])
    assert run.info.run_id == result.mlflow_run_id and run.info.status == "FINISHED"
    assert run.data.params["train.checkpoint_every_steps"] == "5"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == set(range(1, 13))


@pytest.mark.slow
def test_stopped_job_resumes_to_the_same_weights(ray_cluster, digits, tmp_path, monkeypatch):
    from vitray.train import run_training

    # 8 optimizer steps of an epoch of 12 on 1 worker, checkpoints every 4: the stop and the resume fall mid-epoch
    over = {"data": {**DETERMINISTIC, "batch_size": 128}, "train": {"steps": 8, "checkpoint_every_steps": 4},
            "cluster": {"num_workers": 1, "max_failures": 0}}
    full = run_training(make_cfg(digits, tmp_path / "a", **merge(over, {"cluster": {"run_name": "full"}})))
    # the same run, stopped right after the step-4 checkpoint (the driver sees the failure and gives up), then resumed
    monkeypatch.setenv("VITRAY_TEST_KILL_AT_STEP", "5")
    monkeypatch.setenv("VITRAY_TEST_KILL_MARKER", str(tmp_path / "killed"))
    cfg = make_cfg(digits, tmp_path / "b", **merge(over, {"cluster": {"run_name": "stopped"}}))
    with pytest.raises(Exception):
        run_training(cfg)
    monkeypatch.delenv("VITRAY_TEST_KILL_AT_STEP")
    resumed = run_training(cfg, resume="stopped")
    assert [r for r in read_log(resumed.run_dir) if r.get("event") == "resumed"][0]["step"] == 4
    assert full.metrics["step"] == resumed.metrics["step"] == 8
    a, b = export_weights(full), export_weights(resumed)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    # one worker, a fixed stream order and deterministic transforms: the resumed run sees the same batches and
    # restores weights, Adam moments, lr schedule and step; CPU kernels are deterministic, so equality is exact
    assert diff == 0.0, diff


@pytest.mark.slow
def test_zero2_checkpoint_of_2_workers_resumes_on_1(ray_cluster, digits, tmp_path):
    from vitray.train import run_training

    # 6 of an epoch's 12 steps on 2 workers, then 4 more on 1 worker from that (mid-epoch) checkpoint
    first = run_training(make_cfg(digits, tmp_path, train={"steps": 6}, cluster={"run_name": "two"}))
    assert first.checkpoint
    cfg = make_cfg(digits, tmp_path, train={"steps": 10, "log_every_steps": 2}, cluster={"num_workers": 1, "run_name": "one"})
    second = run_training(cfg, resume_from_checkpoint=first.checkpoint)
    event = [r for r in read_log(second.run_dir) if r.get("event") == "resumed"][0]
    assert event["universal"] is True and event["from_workers"] == 2 and event["workers"] == 1
    assert event["step"] == 6
    # the Adam moments came back (a fresh optimizer has none), both moments of every trainable parameter now on the
    # single rank (each of the 2 saving ranks held half)
    from vitray.models import create_model

    trainable = sum(p.numel() for p in create_model("vit_pico_patch4_32", num_classes=10, pos_embed="sincos").parameters()
                    if p.requires_grad)
    assert event["optimizer_moments_sq_sum"] > 0 and event["optimizer_moments_numel"] == 2 * trainable
    steps = [r["step"] for r in read_log(second.run_dir) if "train/loss" in r]
    # went on (a checkpoint written when the step budget ends a run mid-epoch keeps its position)
    assert steps and steps[0] > 6 and second.metrics["step"] == 10, (read_log(second.run_dir), second.metrics)


def test_weight_ema_math():
    from vitray.train.ema import WeightEma

    m = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.constant_(m.weight, 1.0)
    ema = WeightEma(m, decay=0.5)
    torch.nn.init.constant_(m.weight, 3.0)
    ema.update(m)  # 0.5 * 1 + 0.5 * 3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 2.0))
    own = ema.swap_into(m)
    assert torch.allclose(m.weight, torch.full((1, 2), 2.0))
    ema.restore(m, own)
    assert torch.allclose(m.weight, torch.full((1, 2), 3.0))

    warm = WeightEma(m, decay=0.99, warmup=True)  # from 3: decay 1/10, then 2/11, ... capped at 0.99
    torch.nn.init.constant_(m.weight, 13.0)
    warm.update(m)  # 0.1 * 3 + 0.9 * 13
    assert torch.allclose(warm.shadow["weight"], torch.full((1, 2), 12.0)) and warm.current_decay() == 2 / 11
    state = warm.state_dict()
    again = WeightEma(m, decay=0.99, warmup=True)
    again.load_state_dict(state)  # a resumed run continues the warmup where it was
    assert again.updates == 1 and torch.equal(again.shadow["weight"], warm.shadow["weight"])
    assert set(again.shadow) == {"weight"}


def test_ema_with_zero3_is_a_config_error(digits, tmp_path):
    from vitray.config import ConfigError, check_config

    with pytest.raises(ConfigError, match="train.ema.enabled"):
        check_config(make_cfg(digits, tmp_path, train={"ema": {"enabled": True}}, deepspeed={"zero_stage": 3}))


def _register_export(tmp_path: Path, name: str, num_classes: int) -> tuple[str, Path]:
    """A real MLflow registry on sqlite: an export folder logged as a run's artifacts, registered, aliased champion."""
    from vitray.tracking import tracking_scope

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_scope(uri):
        _log_and_register(tmp_path, uri, name, num_classes)
    return uri, tmp_path / "export"


def _log_and_register(tmp_path: Path, uri: str, name: str, num_classes: int) -> None:
    import mlflow
    from mlflow import MlflowClient

    from vitray.models import create_model
    from vitray.models.export import save_export

    exp = mlflow.create_experiment("pre", artifact_location=(tmp_path / "artifacts").as_uri())
    torch.manual_seed(3)
    model = create_model("vit_pico_patch4_32", num_classes=num_classes, pos_embed="sincos")
    export = save_export(tmp_path / "export", model.state_dict(),
                         model={"name": "vit_pico_patch4_32", "num_classes": num_classes, "img_size": 32,
                                "pos_embed": "sincos", "global_pool": "token", "in_chans": 3},
                         task="classification", class_names=[str(i) for i in range(num_classes)],
                         preprocessing={"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                                        "interpolation": "bicubic"})
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(export), artifact_path="model")
    client = MlflowClient()
    client.create_registered_model(name)
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version
    client.set_registered_model_alias(name, "champion", version)


def test_model_uri_resolves_to_the_registered_export(tmp_path):
    from safetensors.torch import load_file

    from vitray.config import ConfigError
    from vitray.tracking import resolve_model_uri

    uri, export = _register_export(tmp_path, "pre", 5)
    for model_uri in ("models:/pre@champion", "models:/pre/1"):
        local = resolve_model_uri(model_uri, uri)
        a, b = load_file(str(local / "model.safetensors")), load_file(str(export / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="models:/nope@champion"):
        resolve_model_uri("models:/nope@champion", uri)


@pytest.mark.slow
def test_finetune_from_registry_uri_with_new_head_and_ema(ray_cluster, digits, tmp_path):
    """Fine-tuning from a registry URI with a new head, the way DeiT fine-tunes: with an EMA of the weights, which
    is evaluated beside the raw weights and is what gets exported."""
    from vitray.models.export import load_export
    from vitray.predict import evaluate_export
    from vitray.train import run_training

    uri, _ = _register_export(tmp_path, "pre10", 5)  # 5 classes -> the digits' 10: new head
    cfg = make_cfg(digits, tmp_path, model={"checkpoint": "models:/pre10@champion"},
                   train={"epochs": 1, "ema": {"enabled": True, "decay": 0.9}}, tracking={"uri": uri})
    result = run_training(cfg)
    assert result.metrics["step"] == 12 and Path(result.export_dir, "model.safetensors").is_file()
    assert "val/top1_ema" in result.metrics and "val/top1" in result.metrics
    model, meta = load_export(result.export_dir)
    acc, n = evaluate_export(model, meta, digits)
    assert n == 195 and acc == pytest.approx(result.metrics["val/top1_ema"], abs=1e-9)  # the export is the EMA
