"""``vitray quickstart``: the whole product on the embedded defaults, on a laptop, in minutes.

Each stage prints what it did and where its output went; the closing summary lists them all.
Stages run in data-flow order; each later subsystem adds its stage here.
"""
from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path

from vitray.config import dump_config, load_config, vitray_home
from vitray.console import log_to, say

__all__ = ["run_quickstart", "quickstart_config_path"]


def quickstart_config_path() -> Path:
    return Path(str(resources.files("vitray") / "configs" / "quickstart.yaml"))


def _stage(n: int, title: str) -> float:
    say(f"\n[{n}] {title}")
    return time.perf_counter()


def run_quickstart(home: str | None = None, overrides: list[str] | None = None) -> int:
    root = (Path(home).expanduser() if home else vitray_home()) / "quickstart"
    root.mkdir(parents=True, exist_ok=True)
    with log_to(root / "logs" / f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}.log") as log_path:
        return _stages(root, home, overrides, log_path)


def _stages(root: Path, home: str | None, overrides: list[str] | None, log_path: Path | None) -> int:
    t_start = time.perf_counter()
    summary: list[tuple[str, str]] = []

    t = _stage(1, "config: embedded defaults, resolved")
    cfg = load_config(quickstart_config_path(), overrides)
    from vitray.config import check_config

    check_config(cfg)
    cfg_path = root / "config.yaml"
    dump_config(cfg, cfg_path)
    say(f"    resolved config -> {cfg_path} ({time.perf_counter() - t:.1f}s)")
    summary.append(("resolved config", str(cfg_path)))

    t = _stage(2, "data: pack scikit-learn's bundled digits into shards")
    from vitray.data.pack import pack

    shards = root / "shards"
    manifest = pack("-", str(shards), "sklearn-digits", val_fraction=0.1, overwrite=True, progress=False)
    cfg.data.path = str(shards)
    dump_config(cfg, cfg_path)
    say(f"    {sum(manifest.counts.values()):,} images ({', '.join(f'{k} {v}' for k, v in manifest.counts.items())}) "
          f"in {len(manifest.shards)} shards -> {shards} ({time.perf_counter() - t:.1f}s)")
    summary.append(("shards", str(shards)))

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
    top1 = result.metrics.get("val/top1")
    say(f"    val top-1 {top1:.3f} after {result.metrics.get('step')} optimizer steps ({result.seconds:.0f}s)")
    summary.append(("run storage", result.run_dir))
    summary.append(("exported model", result.export_dir))
    summary.append(("metrics log", f"{result.run_dir}/metrics.jsonl"))

    t = _stage(4, "check the export offline: load it and classify the val split without Ray")
    from vitray.models.export import load_export

    from .predict import evaluate_export

    model, meta = load_export(result.export_dir)
    acc, n = evaluate_export(model, meta, str(shards), split=cfg.data.val_split)
    say(f"    {n} val images, top-1 {acc:.3f} from {meta['model']['name']} with classes "
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
            agree, n = _pyfunc_agrees(reg.registry_uri, result.export_dir, str(shards), cfg.data.val_split)
        say(f"    {reg.name} v{reg.version} -> @{reg.alias} ({reg.reason})")
        say(f"    mlflow.pyfunc.load_model('{reg.registry_uri}') on {n} val images: top-1 {agree['top1']:.3f}, "
              f"max |p - p_export| {agree['max_abs_diff']:.1e} ({time.perf_counter() - t:.1f}s)")
        from .tracking.uris import client_for

        versions = model_versions(client_for(default_tracking_uri(cfg.tracking.uri)), reg.name)
        say(f"    {len(versions)} version(s) of {reg.name}; list them with `vitray models show {reg.name}`")

    t = _stage(6, "score: every packed image through the registered model with Ray Data, into Parquet")
    if reg is None or not reg.version:
        say("    skipped: no registered model")
    else:
        from .batch import score

        scored = score(f"models:/{reg.name}@{reg.alias}", str(shards), str(root / "predictions"),
                       batch_size=256, tracking_cfg=cfg.tracking, overwrite=True)
        say(f"    {scored.rows:,} rows ({scored.error_rows} errors) -> {scored.output} at {scored.images_per_s:.0f} img/s "
              f"({time.perf_counter() - t:.1f}s; MLflow run {scored.mlflow_run_id})")
        summary.append(("predictions", scored.output))

    t = _stage(7, "serve: the registered model behind Ray Serve on 127.0.0.1, one HTTP request")
    if reg is None or not reg.version:
        say("    skipped: no registered model")
    else:
        url, label, body, precision = _serve_one(cfg, f"models:/{reg.name}@{reg.alias}", str(shards),
                                                 cfg.data.val_split)
        top = body["predictions"][0]
        say(f"    POST {url} with a val image of a {label!r} -> {top['name']!r} (p={top['score']:.3f}) from "
              f"{body['model']} v{body['version']} @{body['alias']}, {precision} ({time.perf_counter() - t:.1f}s)")
        say(f"    serve it yourself: vitray serve --model models:/{reg.name}@{reg.alias}")
    if started_ray:
        import ray

        ray.shutdown()

    if log_path is not None:
        summary.append(("log", str(log_path)))
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
        say(f"see the run's curves and confusion matrix: {ui}, then open "
            f"{run_url('http://127.0.0.1:5000', exp, result.mlflow_run_id) if exp else 'the URL it prints'}")
    return 0


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


def _pyfunc_agrees(model_uri: str, export_dir: str, shards: str, split: str) -> tuple[dict, int]:
    """Top-1 of the registered pyfunc over ``split``, and its largest probability gap to the export run directly."""
    import mlflow
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from .data.formats import Manifest
    from .predict import Predictor

    pyfunc = mlflow.pyfunc.load_model(model_uri)
    direct = Predictor.from_export(export_dir)
    correct = n = 0
    diff = 0.0
    for f in Manifest.read(shards).files(shards, split):
        table = pq.read_table(f, columns=["image", "label"])
        images, labels = table.column("image").to_pylist(), np.asarray(table.column("label"))
        out = pyfunc.predict(pd.DataFrame({"image": images}))
        probs = np.stack(out["probs"].to_numpy())
        diff = max(diff, float(np.abs(probs - direct.probabilities(images)).max()))
        correct += int((out["label"].to_numpy() == labels).sum())
        n += len(labels)
    return {"top1": correct / max(n, 1), "max_abs_diff": diff}, n


def _serve_one(cfg, model_uri: str, shards: str, split: str) -> tuple[str, str, dict, str]:
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
    row = pq.read_table(manifest.files(shards, split)[0], columns=["image", "label"]).slice(0, 1).to_pylist()[0]
    try:
        deploy(cfg)
        url = f"http://{cfg.serve.host}:{port}/v1/classify"
        ctype = "image/png" if row["image"][:4] == b"\x89PNG" else "image/jpeg"
        req = urllib.request.Request(url + "?top_k=3", data=row["image"], method="POST", headers={"content-type": ctype})
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        info = urllib.request.urlopen(f"http://{cfg.serve.host}:{port}/v1/models", timeout=60).read()
        precision = json.loads(info)["models"][0]["precision"]
    finally:
        serve.shutdown()
    return url, manifest.class_names[row["label"]], body, precision
