"""``vitray quickstart [--task T]``: the whole product on the embedded defaults, on a laptop, in minutes.

Each stage prints what it did and where its output went; the closing summary lists them all.
Stages run in data-flow order; each later subsystem adds its stage here. The task (``vitray.tasks``) names its
embedded config and demo dataset; every stage is the same for every task.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from vitray.config import dump_config, load_config, vitray_home
from vitray.console import log_to, say

__all__ = ["run_quickstart", "quickstart_config_path", "QuickstartResult"]


def quickstart_config_path(task: str = "classification") -> Path:
    from vitray.tasks import get_task

    demo = get_task(task).demo
    if demo is None:
        from vitray.tasks import TaskError

        raise TaskError(f"task {task!r} has no quickstart demo yet")
    return Path(str(resources.files("vitray") / "configs" / demo[0]))


def _pack_digits(root: Path):
    """pack scikit-learn's bundled digits into shards."""
    from vitray.data.pack import pack

    return pack("-", str(root / "shards"), "sklearn-digits", val_fraction=0.1, overwrite=True, progress=False), \
        ""


def _compose_digit_scenes(root: Path):
    """compose 2,000 scenes of 32 px from scikit-learn's digits 0, 1, 2 (exact masks), pack them as a mask folder."""
    from vitray.data.compose import compose
    from vitray.data.pack import pack

    composed = compose("-", str(root / "scenes"), source="sklearn-digits", classes="0,1,2", n=2000, size=32,
                       overwrite=True)
    return pack(str(root / "scenes"), str(root / "shards"), "masks", val_fraction=0.2, overwrite=True,
                progress=False), f"{composed.items:,} digits in scenes at {root / 'scenes'}: "


def _compose_digit_scenes_coco(root: Path):
    """compose 2,000 scenes of 64 px from scikit-learn's digits 0, 1, 2 (val scenes: held-out digits), pack the COCO boxes."""
    from vitray.data.compose import compose
    from vitray.data.pack import pack

    composed = compose("-", str(root / "scenes"), source="sklearn-digits", classes="0,1,2", n=2000, size=64,
                       held_out_items=True, overwrite=True)
    return pack(str(root / "scenes" / "annotations.json"), str(root / "shards"), "coco", task="detection",
                images=str(root / "scenes" / "images"), val_fraction=0.2, overwrite=True, progress=False), \
        f"{composed.items:,} digits in scenes at {root / 'scenes'}: "


DEMO_DATA = {"digits": _pack_digits, "digit-scenes": _compose_digit_scenes,
             "digit-scenes-coco": _compose_digit_scenes_coco}  # the datasets TaskInfo.demo names


@dataclass
class QuickstartResult:
    """Where everything went (also printed as the closing summary)."""

    task: str
    config: str
    shards: str
    metrics: dict = field(default_factory=dict)
    export_dir: str | None = None
    model_uri: str | None = None       # the registered champion, models:/NAME@champion
    predictions: str | None = None
    tracking_uri: str | None = None
    log: str | None = None


def _stage(n: int, title: str) -> float:
    say(f"\n[{n}] {title}")
    return time.perf_counter()


def run_quickstart(home: str | None = None, overrides: list[str] | None = None,
                   task: str = "classification") -> QuickstartResult:
    from vitray.tasks import get_task, task_names

    get_task(task, "infer")  # a task that cannot be served has no demo to run
    quickstart_config_path(task)
    base = (Path(home).expanduser() if home else vitray_home()) / "quickstart"
    root = base if task == task_names()[0] else base / task  # the first task's demo keeps the plain layout
    root.mkdir(parents=True, exist_ok=True)
    with log_to(root / "logs" / f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}.log") as log_path:
        return _stages(root, home, overrides, log_path, task)


def _stages(root: Path, home: str | None, overrides: list[str] | None, log_path: Path | None,
            task: str) -> QuickstartResult:
    from vitray.tasks import get_task

    t_start = time.perf_counter()
    summary: list[tuple[str, str]] = []
    info = get_task(task)

    t = _stage(1, "config: embedded defaults, resolved")
    cfg = load_config(quickstart_config_path(task), overrides)
    from vitray.config import check_config

    check_config(cfg)
    cfg_path = root / "config.yaml"
    dump_config(cfg, cfg_path)
    say(f"    resolved config -> {cfg_path} ({time.perf_counter() - t:.1f}s)")
    summary.append(("resolved config", str(cfg_path)))

    t = _stage(2, f"data: {DEMO_DATA[info.demo[1]].__doc__.strip()[:-1]}")
    shards = root / "shards"
    manifest, what = DEMO_DATA[info.demo[1]](root)
    cfg.data.path = str(shards)
    dump_config(cfg, cfg_path)
    say(f"    {what}{sum(manifest.counts.values()):,} images "
        f"({', '.join(f'{k} {v}' for k, v in manifest.counts.items())}) in {len(manifest.shards)} shards -> {shards} "
        f"({time.perf_counter() - t:.1f}s)")
    summary.append(("shards", str(shards)))
    result_out = QuickstartResult(task, str(cfg_path), str(shards))

    t = _stage(3, f"train: {cfg.model.name} on {cfg.cluster.num_workers} Ray Train workers, DeepSpeed "
                  f"ZeRO-{cfg.deepspeed.zero_stage} {cfg.deepspeed.precision}")
    from vitray.train import run_training

    if home and cfg.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):  # everything under --home
        cfg.tracking.uri = _home_store(home)
    if cfg.cluster.storage_path is None:
        cfg.cluster.storage_path = str(root / "runs")
    cfg.cluster.run_name = f"{cfg.cluster.run_name or 'quickstart'}-{time.strftime('%Y%m%d-%H%M%S')}"
    from vitray.train.trainer import _local_cpus, init_ray

    started_ray = init_ray(None, _local_cpus(cfg))  # owned here: training leaves it up for the serving stage
    result = run_training(cfg)
    primary, label = info.primary_metric, info.primary_label
    say(f"    val {label} {result.metrics.get(primary, float('nan')):.3f} after {result.metrics.get('step')} optimizer "
        f"steps ({result.seconds:.0f}s)")
    result_out.metrics, result_out.export_dir = dict(result.metrics), result.export_dir
    summary.append(("run storage", result.run_dir))
    summary.append(("exported model", result.export_dir))
    summary.append(("metrics log", f"{result.run_dir}/metrics.jsonl"))

    t = _stage(4, "check the export offline: load it and evaluate the val split without Ray")
    from vitray.models.export import load_export

    from .predict import export_metrics

    model, meta = load_export(result.export_dir)
    offline, n = export_metrics(model, meta, str(shards), split=cfg.data.val_split)
    say(f"    {n} val images, {label} {offline[primary]:.3f} from {meta['model']['name']} with classes "
        f"{', '.join(meta['class_names'])} ({time.perf_counter() - t:.1f}s)")

    t = _stage(5, "MLflow: the run, the registered version and its alias; load it back as an MLflow pyfunc")
    reg = result.registration
    if reg is None or not reg.version:
        say(f"    not registered: {result.tracking_warning or 'tracking disabled'}")
    else:
        from .tracking import default_tracking_uri
        from .tracking.registry import model_versions

        summary.append(("MLflow store", default_tracking_uri(cfg.tracking.uri)))
        summary.append(("MLflow run", result.mlflow_run_id))
        summary.append(("registered model", f"models:/{reg.name}/{reg.version} (@{reg.alias})"))
        from .tracking import tracking_scope

        with tracking_scope(default_tracking_uri(cfg.tracking.uri)):
            gap, n = _pyfunc_agrees(reg.registry_uri, result.export_dir, str(shards), cfg.data.val_split)
        say(f"    {reg.name} v{reg.version} -> @{reg.alias} ({reg.reason})")
        say(f"    mlflow.pyfunc.load_model('{reg.registry_uri}') on {n} val images: max |p - p_export| {gap:.1e} "
            f"({time.perf_counter() - t:.1f}s)")
        result_out.model_uri = f"models:/{reg.name}@{reg.alias}"
        result_out.tracking_uri = default_tracking_uri(cfg.tracking.uri)
        from .tracking.uris import client_for

        versions = model_versions(client_for(default_tracking_uri(cfg.tracking.uri)), reg.name)
        say(f"    {len(versions)} version(s) of {reg.name}; list them with `vitray models show {reg.name}`")

    t = _stage(6, "score: every packed image through the registered model with Ray Data, into Parquet")
    if reg is None or not reg.version:
        say("    skipped: no registered model")
    else:
        from .batch import score

        scored = score(f"models:/{reg.name}@{reg.alias}", str(shards), str(root / "predictions"),
                       batch_size=256, precision=cfg.score.precision, tracking_cfg=cfg.tracking, overwrite=True)
        say(f"    {scored.rows:,} rows ({scored.error_rows} errors) -> {scored.output} at {scored.images_per_s:.0f} img/s "
              f"({time.perf_counter() - t:.1f}s; MLflow run {scored.mlflow_run_id})")
        summary.append(("predictions", scored.output))
        result_out.predictions = scored.output

    t = _stage(7, "serve: the registered model behind Ray Serve on 127.0.0.1, one HTTP request")
    if reg is None or not reg.version:
        say("    skipped: no registered model")
    else:
        url, image_id, body, precision = _serve_one(cfg, f"models:/{reg.name}@{reg.alias}", str(shards),
                                                    cfg.data.val_split, info.route)
        from .predict import head_of

        say(f"    POST {url} with val image {image_id} -> {head_of({'task': task}).summary_of(body)} from "
            f"{body['model']} v{body['version']} @{body['alias']}, {precision} ({time.perf_counter() - t:.1f}s)")
        say(f"    serve it yourself: vitray serve --model models:/{reg.name}@{reg.alias}")
    if started_ray:
        import ray

        ray.shutdown()

    if log_path is not None:
        summary.append(("log", str(log_path)))
        result_out.log = str(log_path)
    say(f"\nquickstart done in {time.perf_counter() - t_start:.1f}s")
    for what, where in summary:
        say(f"  {what:<18} {where}")
    if reg is not None and reg.version:
        from .tracking.ui import run_url

        from .tracking import default_tracking_uri

        uri = default_tracking_uri(cfg.tracking.uri)
        ui = "vitray ui" if uri == default_tracking_uri(None) else (
            f"vitray ui --home {home}" if home and uri == _home_store(home) else f"vitray ui --tracking-uri {uri}")
        exp = _experiment_id(cfg, result.mlflow_run_id)
        say(f"see the run's curves and {info.pictures}: {ui}, then open "
            f"{run_url('http://127.0.0.1:5000', exp, result.mlflow_run_id) if exp else 'the URL it prints'}")
    return result_out


def _home_store(home: str) -> str:
    """The MLflow store of ``--home DIR`` (``vitray ui --home DIR`` opens the same)."""
    return f"sqlite:///{(Path(home).expanduser().resolve() / 'mlflow' / 'mlflow.db')}"


def _experiment_id(cfg, run_id: str | None) -> str | None:
    from .tracking import default_tracking_uri
    from .tracking.uris import client_for

    try:
        return client_for(default_tracking_uri(cfg.tracking.uri)).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - the line then names the command only
        return None


def _pyfunc_agrees(model_uri: str, export_dir: str, shards: str, split: str) -> tuple[float, int]:
    """The largest difference between the registered pyfunc's answers over ``split`` and the export's own (numbers:
    absolute difference; bytes, text and lists of different shapes such as PNG masks, names or box lists of another
    length: 0 when equal, 1 when not), and the number of images."""
    import mlflow
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from .data.formats import Manifest
    from .predict import Predictor

    pyfunc = mlflow.pyfunc.load_model(model_uri)
    direct = Predictor.from_export(export_dir)
    gap, n = 0.0, 0
    for f in Manifest.read(shards).files(shards, split):
        images = pq.read_table(f, columns=["image"]).column("image").to_pylist()
        got, want = pyfunc.predict(pd.DataFrame({"image": images})), direct.frame(images)
        for col in want.columns:
            for a, b in zip(got[col], want[col]):
                x, y = np.asarray(a), np.asarray(b)
                if x.shape != y.shape or x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
                    gap = max(gap, float(x.shape != y.shape or bool((x != y).any())))
                elif x.size:
                    gap = max(gap, float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()))
        n += len(images)
    return gap, n


def _serve_one(cfg, model_uri: str, shards: str, split: str, route: str) -> tuple[str, str, dict, str]:
    """Deploy ``model_uri`` with the real Serve application, POST one val image, shut Serve down."""
    import json
    import socket
    import urllib.request

    import pyarrow.parquet as pq
    from ray import serve

    from .data.formats import Manifest
    from .serve.app import deploy, model_from_uri

    with socket.socket() as sock:  # the configured port, or any free one when it is taken
        try:
            sock.bind((cfg.serve.host, cfg.serve.port))
            port = cfg.serve.port
        except OSError:
            sock.bind((cfg.serve.host, 0))
            port = sock.getsockname()[1]
    cfg.serve.port = port
    cfg.serve.models = [model_from_uri(model_uri)]
    manifest = Manifest.read(shards)
    row = pq.read_table(manifest.files(shards, split)[0], columns=["id", "image"]).slice(0, 1).to_pylist()[0]
    try:
        deploy(cfg)
        url = f"http://{cfg.serve.host}:{port}{route}"
        ctype = "image/png" if row["image"][:4] == b"\x89PNG" else "image/jpeg"
        req = urllib.request.Request(url, data=row["image"], method="POST", headers={"content-type": ctype})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        info = urllib.request.urlopen(f"http://{cfg.serve.host}:{port}/v1/models", timeout=60).read()
        precision = json.loads(info)["models"][0]["precision"]
    finally:
        serve.shutdown()
    return url, row["id"], body, precision
