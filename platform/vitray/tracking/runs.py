"""Driver side of tracking: check the server, find or create the MLflow run, close it.

The driver opens the run (so an unreachable server fails the command before any training) and hands its id to
the training workers, where rank 0 logs through :class:`vitray.tracking.logger.RunLogger`. A resumed run
(``--resume RUN`` or a restart after a failure) continues the same MLflow run: runs are found by the
``vitray.run_name`` tag.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .uris import client_for, default_tracking_uri

__all__ = ["TrackingError", "TrackedRun", "check_reachable", "start_run", "end_run", "bounded_http",
           "flatten_params", "git_commit", "RUN_NAME_TAG"]

RUN_NAME_TAG = "vitray.run_name"


class TrackingError(RuntimeError):
    """The tracking server cannot be used: the message says which URI and why."""


@dataclass
class TrackedRun:
    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool

    def as_dict(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """An http(s) server must answer ``/health`` now; a sqlite store's folder must be writable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - the user's own server
                if resp.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri}: /health answered HTTP {resp.status}")
        except urllib.error.HTTPError as err:
            raise TrackingError(f"MLflow tracking server {uri}: /health answered HTTP {err.code}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix tracking.uri or "
                "MLFLOW_TRACKING_URI, or set tracking.enabled=false to train without tracking") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"MLflow sqlite store {uri}: cannot create {folder} ({err})") from None
        if not os.access(folder, os.W_OK):
            raise TrackingError(f"MLflow sqlite store {uri}: {folder} is not writable")


@contextlib.contextmanager
def bounded_http(retries: int = 1, timeout_s: float = 15.0):
    """MLflow's REST client retries a lost server for minutes by default; at the end of a run a short, bounded
    try is better (the export is on disk and ``vitray models register`` can redo it)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s)),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def artifact_location_for(uri: str) -> str | None:
    """A sqlite store keeps artifacts in ``artifacts/`` beside the database (MLflow would use ./mlruns of whatever
    folder the process runs in: a Ray worker's session folder). Servers choose their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def ensure_experiment(client, name: str, uri: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created when missing: its artifacts in ``artifact_location`` (``tracking.
    artifact_location``, e.g. ``s3://bucket/mlflow``) or the store's default. An existing experiment keeps its own."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location or artifact_location_for(uri))


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.001", ...}`` (lists as their JSON-ish repr; MLflow caps values at 6000)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_params(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


def git_commit(path: str | None = None) -> str | None:
    """The commit of the code being run: $VITRAY_GIT_COMMIT (set it in images built without .git), else git."""
    if os.environ.get("VITRAY_GIT_COMMIT"):
        return os.environ["VITRAY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path or os.getcwd(), capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def start_run(tracking_cfg, run_name: str, tags: dict[str, str] | None = None, reuse: bool = False) -> TrackedRun:
    """Check the store, then create the MLflow run, or with ``reuse`` (the training resumes) continue the latest run
    tagged with this run name. Raises TrackingError."""
    from mlflow.exceptions import MlflowException

    uri = default_tracking_uri(tracking_cfg.uri)
    check_reachable(uri, tracking_cfg.connect_timeout_s)
    client = client_for(uri)
    try:
        with bounded_http(retries=2, timeout_s=tracking_cfg.connect_timeout_s):
            exp_id = ensure_experiment(client, tracking_cfg.experiment, uri, tracking_cfg.artifact_location)
            found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                       max_results=1, order_by=["attributes.start_time DESC"]) if reuse else []
            if found:
                run_id = found[0].info.run_id
                client.update_run(run_id, status="RUNNING")
                return TrackedRun(uri, exp_id, run_id, True)
            run = client.create_run(exp_id, run_name=run_name, tags={RUN_NAME_TAG: run_name, **(tags or {})})
            return TrackedRun(uri, exp_id, run.info.run_id, False)
    except MlflowException as err:
        raise TrackingError(f"MLflow at {uri}: {str(err).splitlines()[0]}") from None


def log_artifact_file(run: TrackedRun | None, path, artifact_path: str) -> bool:
    """Upload one file (a run's log) into the run's artifacts; a failure is a warning: the file stays on disk."""
    from vitray.console import local_log

    local = local_log(path)
    if run is None or local is None:
        return False
    try:
        with bounded_http():
            client_for(run.tracking_uri).log_artifact(run.run_id, str(local), artifact_path)
        return True
    except Exception as err:  # noqa: BLE001
        print(f"[vitray] warning: could not upload {path} to MLflow run {run.run_id}: "
              f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}", flush=True)
        return False


def end_run(run: TrackedRun | None, status: str = "FINISHED") -> bool:
    """Mark the run finished/failed; False (and a warning) if the server is gone."""
    if run is None:
        return True
    try:
        with bounded_http():
            client_for(run.tracking_uri).set_terminated(run.run_id, status=status)
        return True
    except Exception as err:  # noqa: BLE001 - the run's outcome must not depend on the tracking server
        print(f"[vitray] warning: could not mark MLflow run {run.run_id} {status} at {run.tracking_uri}: "
              f"{str(err).splitlines()[0][:200]}", flush=True)
        return False
