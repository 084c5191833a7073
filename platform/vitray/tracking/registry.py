"""Log an export folder as an MLflow model, register it, and gate the ``champion`` alias on a metric.

The gate: the new version takes ``champion`` only if its ``promotion_metric`` beats the current champion's
(``promotion_mode`` max or min; a tie keeps the champion); otherwise it gets ``challenger``. The first version of a
model is champion. Versions are tagged with their metrics, the run that made them and where the export and the
resume checkpoints live; large resume state never goes through the tracking server.
"""
from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from vitray import storage

from .runs import RUN_NAME_TAG, TrackingError, check_reachable, ensure_experiment
from .uris import client_for, default_tracking_uri, tracking_scope

__all__ = ["Registration", "log_and_register", "gate", "champion_of", "list_models", "model_versions", "set_alias",
           "METRIC_TAG_PREFIX", "CHAMPION", "CHALLENGER"]

CHAMPION, CHALLENGER = "champion", "challenger"
METRIC_TAG_PREFIX = "metric."
_REQUIREMENTS = ("torch", "timm", "safetensors", "numpy", "pandas", "pillow", "simplejpeg", "mlflow")


@dataclass
class Registration:
    model_uri: str  # the logged model (models:/m-...)
    run_id: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    reason: str = ""

    @property
    def registry_uri(self) -> str | None:
        return f"models:/{self.name}/{self.version}" if self.version else None


def _pip_requirements() -> list[str]:
    reqs = []
    for dist in _REQUIREMENTS + ("vitray",):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _local_export(export_dir: str, tmp: str) -> Path:
    """The export folder on this machine (copied down when the run storage is remote, e.g. s3://)."""
    if not storage.is_uri(export_dir):
        return Path(export_dir).expanduser()
    return storage.download_dir(export_dir, Path(tmp) / "export")


def _example_png(img_size: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (img_size, img_size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _version_tag_value(value) -> str:
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def champion_of(client, name: str, metric: str) -> tuple[str | None, float | None]:
    """(version, its metric) of the current champion; (None, None) when there is none."""
    import math

    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:  # no model or no alias yet; anything else (a 5xx, a timeout) must not crown
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None, None
        raise
    value = mv.tags.get(METRIC_TAG_PREFIX + metric)
    if value is None and mv.run_id:
        try:
            value = client.get_run(mv.run_id).data.metrics.get(metric)
        except MlflowException:
            value = None
    try:
        value = float(value) if value is not None else None
    except ValueError:
        value = None
    return str(mv.version), (value if value is not None and math.isfinite(value) else None)


def gate(client, name: str, version: str, value: float | None, metric: str, mode: str) -> tuple[str, str]:
    """Set ``champion`` or ``challenger`` on ``version``; returns (alias, why)."""
    import math

    champ, champ_value = champion_of(client, name, metric)
    if value is not None and not math.isfinite(float(value)):
        value = None
    if champ is None:
        alias, why = CHAMPION, "first version with a champion"
    elif value is None:
        alias, why = CHALLENGER, f"no {metric} to compare with champion v{champ}"
    elif champ_value is None:
        alias, why = CHAMPION, f"champion v{champ} has no {metric}"
    else:
        better = value > champ_value if mode == "max" else value < champ_value
        op = ">" if mode == "max" else "<"
        alias = CHAMPION if better else CHALLENGER
        why = (f"{metric} {value:.4f} {op} champion v{champ}'s {champ_value:.4f}" if better
               else f"{metric} {value:.4f} does not beat champion v{champ}'s {champ_value:.4f}")
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "vitray.gate", f"{alias}: {why}")
    return alias, why


def log_and_register(export_dir: str, tracking_cfg, *, run_id: str | None = None, name: str | None = None,
                     example_image: bytes | None = None, extra_tags: dict | None = None) -> Registration:
    """Log ``export_dir`` as the pyfunc model ``model`` of ``run_id`` (a new run in the experiment if None), then
    register it under ``name`` (default ``tracking.registered_model``; None: log only) and run the gate."""
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    from vitray.export_format import read_export_meta
    from vitray.predict import Predictor
    from vitray.tasks import get_task

    name = name or tracking_cfg.registered_model
    uri = default_tracking_uri(tracking_cfg.uri)
    check_reachable(uri, tracking_cfg.connect_timeout_s)
    client = client_for(uri)
    with tempfile.TemporaryDirectory(prefix="vitray-register-") as tmp, tracking_scope(uri):
        local = _local_export(export_dir, tmp)
        meta = read_export_meta(local)
        try:
            own_run = False
            if run_id is None and meta.get("mlflow_run_id"):
                try:  # the training run that wrote this export, when it lives on this server
                    client.get_run(meta["mlflow_run_id"])
                    run_id = meta["mlflow_run_id"]
                except MlflowException:
                    run_id = None
            if run_id is None:
                exp_id = ensure_experiment(client, tracking_cfg.experiment, uri, tracking_cfg.artifact_location)
                run_name = f"register-{meta['model']['name']}"
                run_id = client.create_run(exp_id, run_name=run_name, tags={
                    "vitray.source": "vitray models register", "vitray.export_dir": str(export_dir)}).info.run_id
                own_run = True
                from mlflow.entities import Metric

                m = meta.get("metrics") or {}
                client.log_batch(run_id, metrics=[Metric(k, float(v), 0, int(m.get("step", 0))) for k, v in m.items()
                                                  if isinstance(v, (int, float))])
            if get_task(meta["task"]).inputs == "prompt":  # a generator: prompts in, PNGs out
                from vitray.tasks.generation.generator import Generator

                predictor = Generator(local)
                example = pd.DataFrame({"prompt": [predictor.example_prompt], "seed": [0]})
                output = predictor.frame(example)
            else:
                example = pd.DataFrame({"image": [example_image or _example_png(meta["preprocessing"]["img_size"])]})
                predictor = Predictor.from_export(local)
                output = predictor.frame(list(example["image"]))
            with warnings.catch_warnings():  # MLflow's hint that an int column cannot hold NaN: label never misses
                warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
                signature = infer_signature(example, output)
            code = str(Path(__file__).with_name("pyfunc_model.py"))
            status_before = client.get_run(run_id).info.status
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(name="model", python_model=code, artifacts={"export": str(local)},
                                               signature=signature, input_example=example,
                                               pip_requirements=_pip_requirements())
            if not own_run:  # start_run(run_id=...) ended it FINISHED: leave the run as it was (training ends it)
                client.update_run(run_id, status=status_before)
            reg = Registration(info.model_uri, run_id)
            if not name:
                return reg
            run = client.get_run(run_id)
            tags = {"vitray.run_id": run_id, "vitray.run_name": run.data.tags.get(RUN_NAME_TAG, run.info.run_name),
                    "vitray.export_dir": str(export_dir), "vitray.model": meta["model"]["name"],
                    "vitray.task": meta["task"], **(extra_tags or {})}
            for k, v in (meta.get("metrics") or {}).items():
                tags[METRIC_TAG_PREFIX + k] = _version_tag_value(v)
            for k in ("vitray.checkpoint_path", "vitray.data.manifest_sha256", "vitray.git_commit"):
                if run.data.tags.get(k):
                    tags[k] = run.data.tags[k]
            mv = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
            info = get_task(meta["task"])  # "auto": the task's primary metric and direction
            if info.card:  # the model card: what this version is (an MAE encoder is a backbone, not a classifier)
                client.update_model_version(name, mv.version, description=f"{info.card} {meta['model']['name']}, "
                                            f"{predictor.describe() if hasattr(predictor, 'describe') else predictor.head.describe(meta)}.")
            metric = info.primary_metric if tracking_cfg.promotion_metric == "auto" else tracking_cfg.promotion_metric
            mode = info.mode if tracking_cfg.promotion_mode == "auto" else tracking_cfg.promotion_mode
            value = (meta.get("metrics") or {}).get(metric)
            alias, why = gate(client, name, mv.version, value, metric, mode)
            reg.name, reg.version, reg.alias, reg.reason = name, str(mv.version), alias, why
            return reg
        except MlflowException as err:
            raise TrackingError(f"MLflow at {uri}: {str(err).splitlines()[0][:300]}") from None


def list_models(client) -> list[dict]:
    out = []
    for rm in client.search_registered_models(max_results=1000):
        versions = model_versions(client, rm.name)
        out.append({"name": rm.name, "versions": len(versions), "aliases": {k: str(v) for k, v in (rm.aliases or {}).items()},
                    "latest": versions[0]["version"] if versions else None,
                    "updated": rm.last_updated_timestamp})
    return out


def model_versions(client, name: str) -> list[dict]:
    """Newest first: version, aliases, metrics from the version tags, run, created."""
    rows = []
    by_version: dict[str, list[str]] = {}
    for alias, version in (client.get_registered_model(name).aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    for mv in client.search_model_versions(f"name = '{name}'", max_results=1000):
        metrics = {k[len(METRIC_TAG_PREFIX):]: v for k, v in (mv.tags or {}).items() if k.startswith(METRIC_TAG_PREFIX)}
        rows.append({"version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])), "metrics": metrics, "run_id": mv.run_id,
                     "created": mv.creation_timestamp, "gate": (mv.tags or {}).get("vitray.gate", ""),
                     "export_dir": (mv.tags or {}).get("vitray.export_dir", "")})
    rows.sort(key=lambda r: int(r["version"]), reverse=True)
    return rows


def set_alias(client, name: str, version: str, alias: str) -> str | None:
    """Point ``alias`` at ``version``; returns the version it pointed at before (None if it was unset)."""
    from mlflow.exceptions import MlflowException

    try:
        before = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        before = None
    client.get_model_version(name, version)  # a clear error for a version that does not exist
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "vitray.gate", f"{alias}: set by hand (vitray models promote)")
    return before
