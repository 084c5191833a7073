"""The per-worker training loop: Ray Train V2 worker, DeepSpeed engine, task-agnostic.

One code path for CPU (gloo) and GPU (NCCL): Ray Train creates the process group for the backend the
``cluster`` section implies, and ``deepspeed.initialize`` reuses it. Every worker runs exactly
``plan.micro_steps_per_epoch`` forwards per epoch (the streaming split gives each the same number of rows, and
leftovers are consumed without training), so ZeRO's collectives never wait on a worker that ran out of data.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch

from vitray.config import parse_config

from .plan import TrainPlan

__all__ = ["train_loop_per_worker", "build_engine", "optimizer_state_norms", "STATE_FILE", "DS_TAG", "METRICS_LOG"]

STATE_FILE = "vitray_state.json"
METRICS_LOG = "metrics.jsonl"  # in the run folder: one JSON line per logged step and per event (rank 0)
DS_TAG = "ds"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _prepare_cpu_deepspeed() -> None:
    """DeepSpeed on a CPU: its CPU accelerator, and no JIT build of the shared-memory collectives op (about 100 s
    at first use) unless asked for with VITRAY_DS_SHM_COMM=1: gloo's all-reduce serves the CPU path."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("VITRAY_DS_SHM_COMM") != "1":
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _all_reduce(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _all_gather(obj) -> list:
    """Every worker's ``obj`` (picklable), in rank order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _all_reduce_tensor(t: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist

    t = t.to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _repair(batch: dict) -> tuple[dict, int, bool]:
    """Rows whose bytes failed to decode (``ok`` False) are replaced by copies of good rows of the same batch, so
    every worker keeps the same batch shape; returns (batch, bad count, any good row)."""
    ok = batch.pop("ok", None)
    if ok is None or bool(ok.all()):
        return batch, 0, True
    good = torch.nonzero(ok).flatten()
    bad = torch.nonzero(~ok).flatten()
    if len(good) == 0:
        return batch, len(bad), False
    src = good[torch.arange(len(bad), device=good.device) % len(good)]
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.shape[:1] == ok.shape:
            v[bad] = v[src]
    return batch, len(bad), True


def build_engine(cfg, plan: TrainPlan, model: torch.nn.Module, *, load_universal: bool = False):
    """AdamW over the model's parameter groups, the warmup+cosine schedule, and the DeepSpeed engine around them.
    Returns (engine, scheduler). Needs the process group (Ray Train's, or any torch.distributed one)."""
    import deepspeed

    from .ds_config import deepspeed_config
    from .optim import build_optimizer, build_scheduler

    if cfg.deepspeed.activation_checkpointing:
        model.set_grad_checkpointing(True)  # timm's per-block torch.utils.checkpoint
    if cfg.cluster.use_gpu and torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))  # so the optimizer can use the fused CUDA kernel
    optimizer = build_optimizer(model, plan.lr, cfg.train.weight_decay, cfg.train.betas, cfg.train.layer_decay)
    scheduler = build_scheduler(optimizer, plan.total_steps, plan.warmup_steps, plan.lr, cfg.train.min_lr,
                                cfg.train.schedule)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=deepspeed_config(cfg.deepspeed, plan, load_universal=load_universal),
                                                   dist_init_required=False)
    return engine, scheduler


def optimizer_state_norms(engine) -> dict[str, float]:
    """Sum of squares of this rank's Adam moments and their element count: what a fresh optimizer lacks (zeros),
    and what ZeRO partitions (about 1/N of ZeRO-0's element count per rank at stage 1 and 2)."""
    inner = engine.optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, torch.optim.Optimizer):
        inner = inner.optimizer
    sq = numel = 0.0
    for state in inner.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = state.get(key)
            if isinstance(t, torch.Tensor):
                sq += float(t.double().pow(2).sum())
                numel += t.numel()
    return {"moments_sq_sum": sq, "moments_numel": numel}


class _Worker:
    def __init__(self, loop_cfg: dict):
        import ray.train

        self.cfg = parse_config(loop_cfg["config"])
        self.plan = TrainPlan(**loop_cfg["plan"])
        self.class_names = loop_cfg["class_names"]
        self.loop_cfg = loop_cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.is_rank0 = self.rank == 0
        if not self.cfg.cluster.use_gpu:
            _prepare_cpu_deepspeed()
        import ray.train.torch

        self.device = ray.train.torch.get_device()
        self.dtype = DTYPES[self.cfg.deepspeed.precision]
        self.last_val: dict[str, float] = {}
        self.skipped_total = 0
        self.tracking = loop_cfg.get("tracking")  # the MLflow run the driver opened (None: tracking off)
        self.logger = None  # rank 0's RunLogger, made at the end of build() (after any model downloads)
        from .progress import WorkerProgress

        self.progress = WorkerProgress(loop_cfg.get("progress_inbox"), self.is_rank0)  # to the driver's console

    # ------------------------------------------------------------------------------------------- setup
    def build(self) -> None:
        import ray.train

        from .tasks import build_task

        cfg, plan = self.cfg, self.plan
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task = build_task(cfg, self.class_names)
        model = self.task.build_model(checkpoint=self._local_weights("init_checkpoint"))

        ckpt = ray.train.get_checkpoint()
        if ckpt is None and self.loop_cfg.get("resume_from"):
            ckpt = ray.train.Checkpoint(self.loop_cfg["resume_from"])
        self.ckpt = ckpt
        self.ckpt_dir = None
        meta = None
        if ckpt is not None:
            self._ckpt_ctx = ckpt.as_directory()
            self.ckpt_dir = Path(self._ckpt_ctx.__enter__())
            meta = json.loads((self.ckpt_dir / STATE_FILE).read_text())
        self.universal = bool(meta and meta["world_size"] != self.world)
        self.engine, self.scheduler = build_engine(cfg, plan, model, load_universal=self.universal)
        self.global_step, self.epoch, self.micro_in_epoch = 0, 0, 0
        self.ema = None
        if cfg.train.ema.enabled:
            from .ema import WeightEma

            self.ema = WeightEma(self.engine.module, cfg.train.ema.decay, warmup=cfg.train.ema.warmup)
        if meta is not None:
            self._restore(meta)
        # randomness that differs per rank (drop path, mixup) but is reproducible from a checkpoint
        torch.manual_seed(cfg.train.seed + 1000 * self.rank + self.global_step)
        judge = self._local_weights("judge_checkpoint")  # a model that judges the task's outputs (generation)
        self.task.setup(self.device, self.dtype, teacher_path=self._local_weights("teacher_checkpoint"),
                        **({"judge_path": judge} if judge else {}))
        from .faults import step_hooks

        self.step_hooks = step_hooks(self.rank, self.world)  # test-only fault injection, when its variables are set
        if self.tracking and self.is_rank0:
            self._start_logger()

    def _start_logger(self) -> None:
        """Never fatal: a store that fails here leaves this run untracked from the workers, with a warning."""
        from vitray.tracking.logger import RunLogger

        try:
            self.logger = RunLogger(self.tracking["tracking_uri"], self.tracking["run_id"],
                                    flush_interval_s=self.cfg.tracking.flush_interval_s)
            self._log_run_info()
        except Exception as err:  # noqa: BLE001
            self.logger = None
            self.progress.say(f"[vitray] warning: MLflow logging from the workers is off for this run: "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")

    def _log_run_info(self) -> None:
        """Params (the flattened resolved config), tags and the config YAML, once per MLflow run (a run the driver
        found again for a resume already has them; re-logging equal values would be accepted anyway)."""
        import ray

        from vitray.config import dump_config
        from vitray.tracking.runs import flatten_params

        tags = dict(self.tracking.get("tags") or {})
        tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
        tags["vitray.workers"] = str(self.world)
        self.logger.set_tags(tags)
        if not self.tracking.get("resumed"):
            self.logger.log_params(flatten_params(self.cfg.model_dump(mode="json")))
            self.logger.log_text(dump_config(self.cfg), "config.yaml")
        self.logger.flush()

    def _local_weights(self, key: str) -> str | None:
        """The driver resolved a models:/ URI (or fetched an object store one) into its own folder; a worker on
        another node fetches it again."""
        path, uri = self.loop_cfg.get(key), self.loop_cfg.get(f"{key}_uri")
        if not path or Path(path).exists() or not uri:
            return path
        from vitray import storage
        from vitray.config import is_model_uri
        from vitray.tracking.uris import resolve_model_uri

        if not is_model_uri(uri):
            return storage.local_copy(uri, key)
        return str(resolve_model_uri(uri, self.cfg.tracking.uri))

    def _restore(self, meta: dict) -> None:
        import torch.distributed as dist

        load_dir = self.ckpt_dir
        if self.universal:
            # DeepSpeed refuses ZeRO optimizer state saved at another data-parallel size; its universal
            # checkpoint re-partitions it. Convert once per node (local rank 0), then every rank loads.
            load_dir = Path(tempfile.gettempdir()) / f"vitray-universal-{os.getpid() if self.world == 1 else 'shared'}-{meta['global_step']}"
            if self.local_rank == 0 and not (load_dir / DS_TAG).exists():
                import subprocess
                import sys

                subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                str(self.ckpt_dir / DS_TAG), "--output_folder", str(load_dir / DS_TAG)],
                               check=True, capture_output=True, text=True)
                (load_dir / "latest").write_text(DS_TAG)
            if dist.is_initialized():
                dist.barrier()
            self.progress.say(f"[vitray] checkpoint of {meta['world_size']} workers -> {self.world}: "
                              "converted to a DeepSpeed universal checkpoint")
        path, client = self.engine.load_checkpoint(str(load_dir), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {load_dir}")
        self.global_step = meta["global_step"]
        self.epoch = meta["epoch"]
        self.micro_in_epoch = meta["micro_in_epoch"]
        self.last_val = meta.get("last_val", {})
        self.skipped_total = meta.get("skipped_total", 0)
        if self.ema is not None and (self.ckpt_dir / "ema.pt").exists():
            self.ema.load_state_dict(torch.load(self.ckpt_dir / "ema.pt", weights_only=True))
        rng = self.ckpt_dir / f"rng_rank{self.rank}.pt"
        if rng.exists() and not self.universal:
            torch.set_rng_state(torch.load(rng, weights_only=True))
        norms = optimizer_state_norms(self.engine)
        reduced = _all_reduce([norms["moments_sq_sum"], norms["moments_numel"]], self.device)
        self.log_line({"event": "resumed", "step": self.global_step, "epoch": self.epoch, "from_workers": meta["world_size"],
                       "workers": self.world, "universal": self.universal, "optimizer_moments_sq_sum": reduced[0],
                       "optimizer_moments_numel": reduced[1]})
        from vitray import storage

        where = storage.uri_in(self.ckpt.path, self.loop_cfg.get("run_dir", ""))
        self.progress.say(f"[vitray] resumed from {where}: epoch {self.epoch}, step {self.global_step}, "
                          f"{self.micro_in_epoch} micro-batches into the epoch")

    def log_line(self, record: dict) -> None:
        """Append to <run>/metrics.jsonl (rank 0, local run storage): the run's own record of every logged step."""
        run_dir = self.loop_cfg.get("run_dir", "")
        if not self.is_rank0 or not run_dir or "://" in run_dir:
            return
        with open(Path(run_dir) / METRICS_LOG, "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")

    # ------------------------------------------------------------------------------------- checkpoint
    def save_and_report(self, metrics: dict, epoch_done: bool) -> None:
        import ray.train

        cfg = self.cfg
        state = {"global_step": self.global_step, "epoch": self.epoch + 1 if epoch_done else self.epoch,
                 "micro_in_epoch": 0 if epoch_done else self.micro_in_epoch, "world_size": self.world,
                 "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision,
                 "last_val": self.last_val, "skipped_total": self.skipped_total, "class_names": self.class_names}
        with tempfile.TemporaryDirectory(prefix="vitray-ckpt-") as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG, client_state={
                "vitray": state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
            torch.save(torch.get_rng_state(), Path(tmp) / f"rng_rank{self.rank}.pt")
            if self.is_rank0:
                (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
                if self.ema is not None:
                    torch.save(self.ema.state_dict(), Path(tmp) / "ema.pt")
            ray.train.report({**self.last_val, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    # -------------------------------------------------------------------------------------------- eval
    def evaluate(self, pictures: bool = False, history: bool = False, last: bool = True) -> dict[str, float]:
        """Val metrics of the trained weights, and with EMA on, of the averaged weights too (``val/top1_ema``...).
        Both passes use the same iterator epoch-wise: the EMA pass reads the val split a second time. With
        ``pictures``, the task's eval pictures of the last pass (the exported weights) go to MLflow; with
        ``history`` (``tracking.log_images: epoch``) each epoch's under ``pictures/epoch_NNN/``, the ``last``
        epoch's under ``pictures/`` too."""
        keep = self.cfg.tracking.image_grid if pictures and self.tracking else 0
        metrics = self._evaluate_pass(keep)
        if metrics and self.ema is not None:
            own = self.ema.swap_into(self.engine.module)
            try:
                ema = self._evaluate_pass(keep)
            finally:
                self.ema.restore(self.engine.module, own)
            metrics.update({f"{k}_ema": v for k, v in ema.items() if k != "val/skipped_images"})
        if metrics and keep:
            t0 = time.perf_counter()
            drawn = self._last_metric.pictures(self.is_rank0)
            for name, image in drawn.items():
                folder, _, base = name.rpartition("/")
                names = [f"{folder}/epoch_{self.epoch + 1:03d}/{base}"] + ([name] if last else []) if history \
                    else [name]
                for path in names if self.logger is not None else []:
                    if path.endswith(".json"):
                        self.logger.log_text(image, path)
                    else:
                        self.logger.log_image(image, path)
            if self.logger is not None:
                self.logger.caller_seconds += time.perf_counter() - t0
        self.last_val = {k: v for k, v in metrics.items() if k.startswith("val/")}
        return metrics

    def _watched(self, shard, batches):
        """The batches, failing the attempt (DataStallError, printed by rank 0) when one takes longer than
        cluster.stall_timeout_s to arrive: a starved pipeline ends with Ray's pending demands, not a silent hang."""
        from vitray.watchdog import DataStallError, watched

        try:
            yield from watched(batches, self.cfg.cluster.stall_timeout_s, pipeline_state=shard.stats,
                               fields="cluster.num_workers or cluster.cpus_per_worker, or data.cpus")
        except DataStallError as err:
            self.progress.say(f"[vitray] {err}" + (f"; {err.details}" if err.details else ""))
            raise

    def _evaluate_pass(self, pictures: int = 0) -> dict[str, float]:
        import ray.train

        shard = ray.train.get_dataset_shard("val") if self.loop_cfg.get("has_val") else None
        if shard is None:
            return {}
        engine, task = self.engine, self.task
        metric = task.metric(pictures)
        engine.eval()
        skipped = 0
        with torch.no_grad():
            for batch in self._watched(shard, shard.iter_torch_batches(
                    batch_size=self.cfg.data.eval_batch_size or self.cfg.data.batch_size, device=self.device)):
                ok = batch.pop("ok")
                skipped += int((~ok).sum())
                batch = {k: v[ok] for k, v in batch.items()}
                if not len(batch["image"]):
                    continue
                metric.update(task.eval_outputs(engine, batch, self.dtype), batch)
        metric.sync(lambda t: _all_reduce_tensor(t, self.device), _all_gather)  # collectives: every rank, once
        skipped = _all_reduce([skipped], self.device)[0]
        engine.train()
        metrics = metric.compute()
        metrics["val/skipped_images"] = skipped
        self._last_metric = metric
        return metrics

    # -------------------------------------------------------------------------------------------- train
    def run(self) -> None:
        import ray.train

        cfg, plan, engine, task = self.cfg, self.plan, self.engine, self.task
        shard = ray.train.get_dataset_shard("train")
        log_every = min(cfg.train.log_every_steps, plan.steps_per_epoch)
        t_start = time.perf_counter()
        steps_at_start = self.global_step
        engine.train()
        while self.epoch < plan.epochs and self.global_step < plan.total_steps:
            skip = self.micro_in_epoch
            micro = 0
            win_loss = torch.zeros((), dtype=torch.float64, device=self.device)  # summed on device: no host sync per step
            win_n = win_imgs = 0.0
            win_t = time.perf_counter()
            epoch_skipped = 0
            t_epoch0 = time.perf_counter()
            t_first = None
            for batch in self._watched(shard, shard.iter_torch_batches(
                    batch_size=plan.micro_batch, drop_last=True, device=self.device,
                    local_shuffle_buffer_size=self.loop_cfg["shuffle_buffer"] or None,
                    local_shuffle_seed=cfg.data.seed + 1000 * self.epoch + self.rank)):
                t_first = t_first or time.perf_counter()
                if micro < skip or micro >= plan.micro_steps_per_epoch or self.global_step >= plan.total_steps:
                    micro += 1  # resume position, leftover rows: consumed, not trained on
                    continue
                batch, bad, any_good = _repair(batch)
                epoch_skipped += bad
                loss = task.training_loss(engine, batch, self.dtype)
                if not any_good:
                    loss = loss * 0.0  # keep the collectives in step; nothing learned from an all-bad batch
                engine.backward(loss)
                boundary = engine.is_gradient_accumulation_boundary()
                engine.step()
                micro += 1
                self.micro_in_epoch = micro
                win_loss += loss.detach().double()
                win_n += 1
                win_imgs += len(batch["image"])
                if not boundary:
                    continue
                self.global_step += 1
                if self.ema is not None:
                    self.ema.update(engine.module)
                metrics = None
                if self.global_step % log_every == 0 or self.global_step == plan.total_steps:
                    loss_sum, n, imgs, skipped = _all_reduce([float(win_loss), win_n, win_imgs, epoch_skipped], self.device)
                    dt = time.perf_counter() - win_t
                    metrics = {"train/loss": loss_sum / max(n, 1), "train/lr": self.scheduler.get_last_lr()[0],
                               "train/images_per_s": imgs / max(dt, 1e-9), "epoch": self.epoch, "step": self.global_step,
                               "train/skipped_images": self.skipped_total + skipped}
                    if self.is_rank0:
                        done = self.global_step - steps_at_start
                        rate = done / max(time.perf_counter() - t_start, 1e-9)
                        self.progress.step(self.epoch, plan.epochs, self.global_step, metrics["train/loss"],
                                           metrics["train/lr"], metrics["train/images_per_s"],
                                           (plan.total_steps - self.global_step) / max(rate, 1e-9))
                    self.log_line(metrics)
                    if self.logger is not None:
                        self.logger.log_metrics(metrics, self.global_step)
                    win_loss.zero_()
                    win_n = win_imgs = 0.0
                    win_t = time.perf_counter()
                if cfg.train.eval_every_steps and self.global_step % cfg.train.eval_every_steps == 0 \
                        and micro < plan.micro_steps_per_epoch:
                    self.evaluate()
                if cfg.train.checkpoint_every_steps and self.global_step % cfg.train.checkpoint_every_steps == 0 \
                        and micro < plan.micro_steps_per_epoch and self.global_step < plan.total_steps:
                    self.save_and_report(metrics or {"epoch": self.epoch, "step": self.global_step}, epoch_done=False)
                for hook in self.step_hooks:
                    hook(self.global_step)
            t_ep = time.perf_counter()
            self.skipped_total += int(_all_reduce([epoch_skipped], self.device)[0])
            last = self.epoch + 1 >= plan.epochs or self.global_step >= plan.total_steps
            mode = cfg.tracking.log_images
            val = self.evaluate(pictures=mode == "epoch" or (mode == "end" and last), history=mode == "epoch",
                                last=last)
            t_eval = time.perf_counter()
            metrics = {"epoch": self.epoch, "step": self.global_step, "train/skipped_images": self.skipped_total, **val}
            self.log_line({"event": "epoch_end", **metrics})
            if self.logger is not None:  # sent with the next batch (every tracking.flush_interval_s) or at the end
                self.logger.log_metrics(metrics, self.global_step)
            if self.is_rank0 and val:
                shown = " ".join(f"{k} {v:.4f}" for k, v in val.items() if k != "val/skipped_images")
                key = cfg.cluster.checkpoint_score_metric
                self.progress.epoch(f"[vitray] epoch {self.epoch + 1}/{plan.epochs} done: {shown}", final=last,
                                    primary=(key, val[key]) if key in val else None)
            # the step budget can end a run mid-epoch: its checkpoint then keeps the position, so a resume with a
            # larger budget (train.steps) goes on from there instead of believing the epoch was done
            stopped_mid_epoch = self.global_step >= plan.total_steps and self.micro_in_epoch < plan.micro_steps_per_epoch
            self.save_and_report(metrics, epoch_done=not stopped_mid_epoch)
            if self.is_rank0 and os.environ.get("VITRAY_DEBUG_TIMING"):
                print(f"[timing] epoch total {time.perf_counter() - t_epoch0:.2f}s first batch {t_first - t_epoch0:.2f}s "
                      f"eval {t_eval - t_ep:.2f}s ckpt {time.perf_counter() - t_eval:.2f}s", flush=True)
            self.epoch += 1
            self.micro_in_epoch = 0

    def export(self) -> None:
        """Consolidated fp32 model-only weights (gathered from the ZeRO partitions) into the export folder."""
        from .export import gather_fp32_state_dict, write_export

        state = gather_fp32_state_dict(self.engine)
        if self.ema is not None:  # with EMA on, the export is the averaged model (as DeiT reports it)
            state.update({k: v.clone() for k, v in self.ema.shadow.items()})
        if self.is_rank0:
            extra = {"mlflow_run_id": self.tracking["run_id"], "mlflow_tracking_uri": self.tracking["tracking_uri"]} \
                if self.tracking else {}
            if self.loop_cfg.get("category_ids"):  # the source's class ids (COCO categories), for answers in them
                extra["category_ids"] = self.loop_cfg["category_ids"]
            metrics = dict(self.last_val)
            if self.ema is not None:  # the export is the EMA model: its metrics under the plain names (the gate's)
                for key in [k for k in metrics if k.endswith("_ema")]:
                    base = key[:-len("_ema")]
                    metrics[f"{base}_raw"] = metrics.get(base)
                    metrics[base] = metrics.pop(key)
            write_export(self.loop_cfg["export_dir"], state, self.cfg, self.class_names,
                         metrics={**metrics, "step": self.global_step}, extra=extra)
            self.progress.say(f"[vitray] exported model to {self.loop_cfg['export_dir']}")
        self.close_logger()

    def close_logger(self, timeout_s: float = 30.0) -> None:
        if self.logger is None:
            return
        logger, self.logger = self.logger, None
        logger.close(timeout_s)
        self.log_line({"event": "tracking_closed", "requests": logger.sent_requests,
                       "caller_seconds": logger.caller_seconds, "unsent": logger.pending()})


def train_loop_per_worker(loop_cfg: dict) -> None:
    worker = _Worker(loop_cfg)
    try:
        worker.build()
        worker.run()
        worker.export()
    finally:  # a failing attempt still sends what it logged (briefly: the restart must not wait on MLflow)
        worker.close_logger(timeout_s=10.0)
