"""Driver side of ``vitray train``: config -> datasets -> Ray Train V2 ``TorchTrainer`` -> export folder.

``cluster`` maps onto Ray Train: ``num_workers``/``use_gpu``/``cpus_per_worker``/``gpus_per_worker`` onto
``ScalingConfig``; ``storage_path``/``run_name``/``max_failures``/checkpoint retention onto ``RunConfig``. A worker
failure restarts the group from the last reported checkpoint (up to ``max_failures``); a rerun with the same run
name (``vitray train CONFIG --resume RUN``) restores the latest checkpoint of that run.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from vitray import console, storage
from vitray.config import RunConfig, check_config, dump_config, vitray_home

__all__ = ["TrainResult", "run_training", "init_ray", "storage_root"]


@dataclass
class TrainResult:
    run_name: str
    run_dir: str
    export_dir: str
    metrics: dict
    checkpoint: str | None
    seconds: float
    mlflow_run_id: str | None = None
    registration: object | None = None  # vitray.tracking.registry.Registration, when registered
    tracking_warning: str | None = None  # why logging the model or registering it failed (the export is on disk)


def storage_root(cfg: RunConfig) -> str:
    return cfg.cluster.storage_path or str(vitray_home() / "runs")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` or start a local Ray pinned to 127.0.0.1. Returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # object storage credentials and endpoint reach the workers of an existing cluster (a local Ray inherits them)
    env_vars = {"PYTHONWARNINGS": "ignore::DeprecationWarning", **storage.forwarded_env()}
    env = {"env_vars": {k: v for k, v in env_vars.items() if k not in storage.ray_job_env_keys()}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return False
    # worker output comes to the driver (log_to_driver): into the command's log file, see vitray.console
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=env,
             configure_logging=False, log_to_driver=True)
    return True


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars off (unless --verbose): each stage has one vitray progress display, and the
    datasets Ray Train runs inside its split coordinator would otherwise redraw bars into the log."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = console.verbose()


def _local_cpus(cfg: RunConfig) -> int:
    """Logical CPUs for a local Ray: the trainers' reservation plus room for Ray Data's decode tasks. On a small
    machine this oversubscribes the cores on purpose: trainers and decoders then share them, as threads would."""
    cores = os.cpu_count() or 1
    trainers = int(cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 0.999)
    return max(cores, trainers + max(2, cores // 2))


def _resolve_weights(uri: str | None, field: str, tracking_uri: str | None) -> str | None:
    """A local weights path as is; a models:/ or runs:/ URI downloaded from the MLflow registry to an export folder."""
    from vitray import storage
    from vitray.config import ConfigError, is_model_uri

    if not uri:
        return uri
    if not is_model_uri(uri):
        return storage.local_copy(uri, field)
    from vitray.tracking.uris import resolve_model_uri

    try:
        return str(resolve_model_uri(uri, tracking_uri))
    except ConfigError as err:
        raise ConfigError(f"{field}: {err}") from None


def _ray_storage(root: str) -> dict:
    """Ray Train's storage arguments. An object store goes in as the filesystem vitray resolved here (its endpoint
    included), so the train controller and workers use the same store even where ``AWS_ENDPOINT_URL`` is not set
    (a Ray that was started before it); credentials still come from each process's environment or role."""
    if not storage.is_uri(root):
        return {"storage_path": root}
    fs, inner = storage.resolve(root)
    return {"storage_path": inner, "storage_filesystem": fs}


def _has_checkpoints(run_dir: str) -> bool:
    """Ray Train will restore this run name from its checkpoints (a local folder or an object store prefix)."""
    if not storage.is_uri(run_dir):
        return any(Path(run_dir).glob("checkpoint_*"))
    return any(storage.basename(p).startswith("checkpoint_") or "/checkpoint_" in p
               for p, _ in storage.list_files(run_dir, recursive=True))


def _tracking_tags(cfg: RunConfig, spec, run_dir: str, export_dir: str) -> dict[str, str]:
    """What identifies the run beyond its params: code, data, where its resume state and export live."""
    import json

    from vitray import __version__
    from vitray.tracking.runs import git_commit

    tags = {"vitray.version": __version__, "vitray.checkpoint_path": run_dir, "vitray.export_dir": export_dir,
            "vitray.data.path": str(cfg.data.path), "vitray.data.format": cfg.data.format, "vitray.task": cfg.train.task,
            "vitray.model": cfg.model.name}
    commit = git_commit()
    if commit:
        tags["vitray.git_commit"] = tags["mlflow.source.git.commit"] = commit
    if spec.fingerprint:
        tags["vitray.data.fingerprint"] = spec.fingerprint
    manifest = storage.join(str(cfg.data.path), "manifest.json")
    if cfg.data.format == "shards" and storage.is_file(manifest):
        tags["vitray.data.manifest_sha256"] = storage.sha256_of(manifest)
    try:  # `ray job submit`: the submission id the user sees in `ray job list`
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        sub = (job.get("metadata") or {}).get("job_submission_id")
        if sub:
            tags["ray.submission_id"] = sub
    except ValueError:
        pass
    return tags


def _example_image(spec) -> bytes | None:
    """One real encoded image for the MLflow model's input example (packed shards only; else a synthetic one)."""
    import pyarrow.parquet as pq

    if spec.format != "shards":
        return None
    for files in spec.files.values():
        for f in files:
            try:
                with storage.open_input(f) as fh:
                    col = pq.ParquetFile(fh).read_row_group(0, columns=["image"]).column("image")
                if len(col):
                    return col[0].as_py()
            except Exception:  # noqa: BLE001 - an example is a nicety
                return None
    return None


def _register(cfg: RunConfig, result: "TrainResult", tracked, spec) -> None:
    """Log the export as the run's MLflow model and register it (gate included). A lost server leaves the export
    on disk and a warning saying how to redo it."""
    from vitray.tasks import get_task
    from vitray.tracking.registry import log_and_register
    from vitray.tracking.runs import bounded_http

    if not get_task(cfg.train.task).has("infer"):  # an MLflow model is what serving and scoring load
        print(f"[vitray] not logged as an MLflow model: a {cfg.train.task} model cannot be served or scored yet; "
              f"its export is {result.export_dir}", flush=True)
        return
    try:
        with bounded_http():
            reg = log_and_register(result.export_dir, cfg.tracking, run_id=tracked.run_id,
                                   example_image=_example_image(spec))
        result.registration = reg
        if reg.version:
            print(f"[vitray] registered {reg.name} v{reg.version} -> @{reg.alias} ({reg.reason})", flush=True)
        else:
            print(f"[vitray] logged MLflow model {reg.model_uri} (set tracking.registered_model to register it)",
                  flush=True)
    except Exception as err:  # noqa: BLE001 - training succeeded; the export is the source of truth
        result.tracking_warning = (f"MLflow model logging/registration failed ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0][:200] if str(err) else ''}); the export is safe in "
                                   f"{result.export_dir}: redo it with `vitray models register {result.export_dir}`")
        print(f"[vitray] warning: {result.tracking_warning}", flush=True)


def _plan_resources(cfg: RunConfig):
    """What the trainers reserve and what is left for Ray Data, printed; fails fast (CapacityError, exit 1) when the
    trainers would take every CPU (or more GPUs than there are) and the cluster will not grow in time."""
    from vitray.capacity import ensure_capacity, plan_resources

    c = cfg.cluster
    gpus = c.num_workers * c.gpus_per_worker if c.use_gpu else 0.0
    what = (f"{c.num_workers} trainer{'s' if c.num_workers > 1 else ''} x {c.cpus_per_worker:g} CPU"
            + (f" + {c.gpus_per_worker:g} GPU" if c.use_gpu else ""))
    fields = ["cluster.num_workers", "cluster.cpus_per_worker"] + (["cluster.gpus_per_worker"] if c.use_gpu else [])
    plan = plan_resources("train", what, c.num_workers * c.cpus_per_worker, gpus, fields=fields,
                          grow_wait_s=c.resource_wait_s, data_cpus=cfg.data.cpus)
    print(plan.line(), flush=True)
    return ensure_capacity(plan)


def _check_task(cfg: RunConfig, spec, teacher: str | None = None):
    """On the driver, before Ray starts: the data holds what the task trains on, with the model's class count, and a
    teacher export is of the same task (a worker failing on it would be retried ``cluster.max_failures`` times for
    nothing). Returns the spec as the task reads it: a task that trains without labels (``mae``) reads the images
    of any pack, as its own unlabeled data."""
    import dataclasses

    from vitray.config import ConfigError
    from vitray.models.export import EXPORT_META, read_export_meta
    from vitray.tasks import get_task

    if teacher and (Path(teacher) / EXPORT_META).is_file():
        meta = read_export_meta(teacher)
        if meta["task"] != cfg.train.task:
            raise ConfigError(f"train.distillation.teacher: a {meta['task']} model cannot teach {cfg.train.task}")

    info = get_task(cfg.train.task)
    if not info.labelled:
        return dataclasses.replace(spec, task=cfg.train.task, class_names=[], category_ids=None)
    if spec.task in info.reads:  # another task's pack, read by this task's codec (its class names kept)
        spec = dataclasses.replace(spec, task=cfg.train.task)
    if spec.task != cfg.train.task:
        raise ConfigError(f"train.task: {cfg.train.task!r}, but {cfg.data.path} holds {spec.task} data "
                          f"(its manifest says so); pack {cfg.train.task} data or set train.task: {spec.task}")
    if spec.class_names and len(spec.class_names) != cfg.model.num_classes:
        shown = ", ".join(spec.class_names[:5]) + (", ..." if len(spec.class_names) > 5 else "")
        raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but {cfg.data.path} has "
                          f"{len(spec.class_names)} classes ({shown})")
    return spec


def _warn_class_mix(cfg: RunConfig, spec) -> None:
    """Shards whose class mix is far from their split's (packed in class order by an older vitray or another tool)
    train badly whatever the read-time shuffle: say so before training, as `vitray data inspect` does."""
    from vitray.data.class_mix import file_mixes, mix_warning, shard_mixes

    if spec.format == "shards":
        mixes = shard_mixes(cfg.data.path)
    elif spec.format == "parquet" and spec.class_names:
        mixes = file_mixes({cfg.data.train_split: spec.files.get(cfg.data.train_split, [])}, spec.task, spec.class_names)
    else:
        return
    mixes = [x for x in mixes if x.split == cfg.data.train_split]
    warning = mix_warning(mixes, f"{cfg.data.train_split} shards" if spec.format == "shards" else "Parquet files")
    if warning:
        print(f"[vitray] warning: {warning}", flush=True)


def _data_config(cfg: RunConfig, data_cpus: float | None = None):
    """Ray Train's DataConfig, with two vitray rules: the val split is shared out *unequally* (equal=True would drop
    up to workers-1 images from every evaluation; only ZeRO-3, whose forward is a collective, needs equal shares),
    and ``data.shuffle: false`` keeps the stream order (Ray Train's ingest options would otherwise reset it).
    ``data_cpus``: Ray Data's CPU limit, set explicitly (``data.cpus``, or on a fixed-size cluster what the trainers
    leave: the same as Ray Train's own exclusion of their reservation, but stated)."""
    from ray.train import DataConfig

    class VitrayDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
            val = {k: v for k, v in datasets.items() if k == "val"}
            rest = {k: v for k, v in datasets.items() if k != "val"}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs) if rest \
                else [{} for _ in range(world_size)]
            for name, ds in val.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                ds.context.execution_options.preserve_order = True
                equal = cfg.deepspeed.zero_stage == 3
                for i, split in enumerate(ds.streaming_split(world_size, equal=equal)):
                    out[i][name] = split
            return out

    options = None
    if not cfg.data.shuffle or data_cpus:
        opts = DataConfig.default_ingest_options()
        opts.preserve_order = not cfg.data.shuffle
        if data_cpus:
            opts.resource_limits = opts.resource_limits.copy(cpu=data_cpus)
        options = {"train": opts, "val": opts}
    return VitrayDataConfig(execution_options=options)


def _maybe_materialize_val(datasets: dict, spec, cfg: RunConfig, img_size: int) -> None:
    """The eval transform is deterministic: when the decoded val split fits comfortably in the object store (a
    fifth of it), decode it once instead of re-reading and re-decoding it every epoch (seconds per epoch saved on
    small sets; large sets keep streaming)."""
    import ray

    if "val" not in datasets:
        return
    rows = spec.counts.get(cfg.data.val_split)
    store = ray.cluster_resources().get("object_store_memory", 0)
    if rows and rows * 3 * img_size * img_size < 0.2 * store:
        datasets["val"] = datasets["val"].materialize()


def run_training(cfg: RunConfig, *, address: str | None = None, resume: str | None = None,
                 resume_from_checkpoint: str | None = None, extra_env: dict | None = None) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from vitray.data.pipeline import build_datasets, dataset_spec, shuffle_buffer_rows
    from vitray.models.zoo import default_img_size

    from .loop import train_loop_per_worker
    from .plan import make_plan
    from .progress import DriverProgress

    check_config(cfg)
    # before any cluster work: a bad URI fails in seconds, and workers get a local folder (no MLflow access needed)
    init_checkpoint = _resolve_weights(cfg.model.checkpoint, "model.checkpoint", cfg.tracking.uri)
    teacher_checkpoint = _resolve_weights(cfg.train.distillation.teacher, "train.distillation.teacher", cfg.tracking.uri)
    from vitray.tasks import get_task

    section = get_task(cfg.train.task).options  # a task whose options name a judge model (generation)
    judge_uri = getattr(cfg.task_options(), "judge", None)
    judge_checkpoint = _resolve_weights(judge_uri, f"{section}.judge", cfg.tracking.uri)
    t0 = time.perf_counter()
    spec = dataset_spec(cfg.data)
    spec = _check_task(cfg, spec, teacher_checkpoint)
    if spec.class_names:
        _warn_class_mix(cfg, spec)
    img_size = cfg.model.img_size or default_img_size(cfg.model.name)
    run_name = resume or cfg.cluster.run_name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    root = storage_root(cfg)
    if not storage.is_uri(root):
        root = str(Path(root).expanduser().resolve())
    run_dir = storage.join(root, run_name)
    export_dir = f"{run_dir}/export"
    tracked, tags = None, {}
    if cfg.tracking.enabled:  # before any cluster work: an unreachable server fails the command in seconds
        from vitray.tracking.runs import start_run

        tags = _tracking_tags(cfg, spec, run_dir, export_dir)
        # continue the MLflow run only when the training itself continues (--resume, or Ray Train restoring the
        # checkpoints of this run name); a fresh run that reuses a run name gets a fresh MLflow run
        continuing = resume is not None or resume_from_checkpoint is not None or _has_checkpoints(run_dir)
        tracked = start_run(cfg.tracking, run_name, tags, reuse=continuing)
        print(f"[vitray] MLflow run {tracked.run_id} ({'resumed' if tracked.resumed else 'new'}) in experiment "
              f"{cfg.tracking.experiment!r} at {tracked.tracking_uri}", flush=True)
    address = address or cfg.cluster.address
    started = False
    status = "FAILED"
    live = contextlib.ExitStack()  # the progress display: closed when fit() returns, or on any failure
    logs = contextlib.ExitStack()  # the run's log file: written to the end of the command's work for this run
    log_path = None
    try:
        log_path = logs.enter_context(console.log_to(storage.join(run_dir, "logs",
                                                                   f"train-{time.strftime('%Y%m%d-%H%M%S')}.log")))
        started = init_ray(address, None if address else _local_cpus(cfg))
        if tracked is not None and not tracked.tracking_uri.startswith(("http://", "https://", "databricks")):
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            if len(nodes) > 1:  # rank 0 may run on another node, where this file does not exist
                from vitray.config import ConfigError

                raise ConfigError(f"tracking.uri: {tracked.tracking_uri} is a file on this machine, but the Ray cluster "
                                  f"has {len(nodes)} nodes; point tracking.uri (or MLFLOW_TRACKING_URI) at an MLflow "
                                  "server the workers can reach")
        rplan = _plan_resources(cfg)
        _quiet_ray_data()
        spec, datasets = build_datasets(cfg.data, img_size=img_size, spec=spec, max_boxes=cfg.data.max_boxes)
        train_rows = spec.counts.get(cfg.data.train_split) or datasets["train"].count()
        _maybe_materialize_val(datasets, spec, cfg, img_size)
        plan = make_plan(cfg, train_rows)
        if not storage.is_uri(run_dir):
            Path(run_dir).mkdir(parents=True, exist_ok=True)
        storage.write_text(storage.join(run_dir, "config.yaml"), dump_config(cfg))
        print(f"[vitray] run {run_name}: {plan.train_rows:,} train images, {plan.epochs} epochs x {plan.steps_per_epoch} "
              f"steps = {plan.total_steps} optimizer steps; global batch {plan.global_batch} = {plan.micro_batch} x "
              f"accum {plan.grad_accum} x {plan.num_workers} workers; {plan.lr_rule}; ZeRO-{cfg.deepspeed.zero_stage} "
              f"{cfg.deepspeed.precision}, {'GPU/NCCL' if cfg.cluster.use_gpu else 'CPU/gloo'}", flush=True)
        loop_cfg = {
            "config": cfg.model_dump(mode="json"), "plan": plan.as_dict(), "class_names": spec.class_names,
            "category_ids": spec.category_ids,
            "has_val": "val" in datasets, "export_dir": export_dir, "run_dir": run_dir,
            "shuffle_buffer": shuffle_buffer_rows(cfg.data, img_size),
            "init_checkpoint": init_checkpoint, "teacher_checkpoint": teacher_checkpoint,
            "init_checkpoint_uri": cfg.model.checkpoint, "teacher_checkpoint_uri": cfg.train.distillation.teacher,
            "judge_checkpoint": judge_checkpoint, "judge_checkpoint_uri": judge_uri,
            "resume_from": resume_from_checkpoint,
            "tracking": None if tracked is None else {**tracked.as_dict(), "resumed": tracked.resumed,
                                                      "tags": tags},
        }
        shown = live.enter_context(contextlib.closing(DriverProgress(plan.total_steps, plan.epochs)))
        loop_cfg["progress_inbox"] = shown.inbox
        resources = {"CPU": cfg.cluster.cpus_per_worker}
        if cfg.cluster.use_gpu:
            resources["GPU"] = cfg.cluster.gpus_per_worker
        score = cfg.cluster.checkpoint_score_metric if "val" in datasets else None
        # Ray Train V2 prints every worker `print` twice (its logger and the stream); one copy is enough
        env = {"PYTHONWARNINGS": "ignore", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(extra_env or {})}
        if not cfg.cluster.use_gpu:
            env["DS_ACCELERATOR"] = "cpu"
        for key in ("VITRAY_TEST_KILL_AT_STEP", "VITRAY_TEST_KILL_MARKER", "VITRAY_DS_SHM_COMM", "TORCH_EXTENSIONS_DIR",
                    "MLFLOW_TRACKING_URI", "VITRAY_HOME"):
            if key in os.environ:
                env.setdefault(key, os.environ[key])
        for key, value in storage.forwarded_env().items():  # object storage credentials and endpoint
            env.setdefault(key, value)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_cfg,
            scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
            datasets=datasets,
            dataset_config=_data_config(cfg, cfg.data.cpus or (rplan.data_cpus if not cfg.cluster.resource_wait_s
                                                                else None)),
            run_config=RayRunConfig(
                name=run_name, **_ray_storage(root),
                failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.cluster.checkpoints_to_keep,
                                                   checkpoint_score_attribute=score,
                                                   checkpoint_score_order=cfg.cluster.checkpoint_score_mode),
                worker_runtime_env={"env_vars": env},
            ),
        )
        result = trainer.fit()
        live.close()  # the last progress events shown before what follows
        if result.error:
            raise result.error
        out = TrainResult(run_name, run_dir, export_dir, dict(result.metrics or {}),
                          storage.uri_in(result.checkpoint.path, root) if result.checkpoint else None,
                          time.perf_counter() - t0,
                          mlflow_run_id=tracked.run_id if tracked else None)
        if tracked is not None:
            _register(cfg, out, tracked, spec)
        status = "FINISHED"
        return out
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        live.close()
        if log_path is not None:
            console.say(f"[vitray] log of this run: {log_path}")
        if tracked is not None:
            from vitray.tracking.runs import end_run, log_artifact_file

            console.drain()
            log_artifact_file(tracked, log_path or console.current_log(), "logs")
            end_run(tracked, status)
        logs.close()
        if started:
            ray.shutdown()
