"""``vitray ui``: the MLflow UI on the store vitray logs to, one command away.

The store is the one every other command uses (``--tracking-uri``, else the config's ``tracking.uri``, else
``$MLFLOW_TRACKING_URI``, else the embedded sqlite store). A local store (sqlite, a file store) gets an
``mlflow server`` child process bound to 127.0.0.1, whose own output goes to ``$VITRAY_HOME/logs``; a store that is
already a server is not started again, only its address is printed. Either way the URL of the latest run comes
first, so the page a person wants is one click away.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .runs import artifact_location_for, check_reachable
from .uris import client_for

__all__ = ["LatestRun", "latest_runs", "run_url", "start_server", "UiError"]


class UiError(RuntimeError):
    """The server did not come up (the message names why and where its log is)."""


@dataclass
class LatestRun:
    experiment_id: str
    experiment: str
    run_id: str
    name: str
    status: str


def latest_runs(tracking_uri: str, look_back: int = 200) -> tuple[LatestRun | None, LatestRun | None]:
    """(the most recently started run of any active experiment, the most recent *training* run), None when the
    store has none. A quickstart ends with a scoring run; the page a person wants is the training run's."""
    from mlflow.entities import ViewType

    client = client_for(tracking_uri)
    exps = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    if not exps:
        return None, None
    runs = client.search_runs([e.experiment_id for e in exps], order_by=["attributes.start_time DESC"],
                              max_results=look_back)
    names = {e.experiment_id: e.name for e in exps}

    def entry(run) -> LatestRun:
        return LatestRun(run.info.experiment_id, names.get(run.info.experiment_id, ""), run.info.run_id,
                         run.info.run_name or "", run.info.status)

    training = next((r for r in runs if r.data.tags.get("vitray.task") and r.data.tags.get("vitray.source")
                     not in ("vitray score", "vitray models register")), None)
    return (entry(runs[0]) if runs else None), (entry(training) if training else None)


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _free_port(host: str, port: int) -> int:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            s.bind((host, 0))
        return s.getsockname()[1]


def start_server(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000, log_dir: Path | None = None,
                 timeout_s: float = 90.0) -> tuple[subprocess.Popen, str, Path]:
    """Start ``mlflow server`` on ``tracking_uri`` and wait for its health check. Returns (process, base URL, log
    file). The port is ``port`` when it is free, else any free one."""
    from vitray.config import vitray_home

    port = _free_port(host, port)
    log_dir = log_dir or vitray_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"ui-{time.strftime('%Y%m%d-%H%M%S')}-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    root = artifact_location_for(tracking_uri)
    if root:  # new experiments made from the UI keep their artifacts beside the database, as vitray's do
        cmd += ["--default-artifact-root", root, "--no-serve-artifacts"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    base = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise UiError(f"mlflow server exited with code {proc.returncode}: {' | '.join(tail)} (log: {log_path})")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, base, log_path
        except OSError:
            time.sleep(0.3)
    stop_server(proc)
    raise UiError(f"mlflow server did not answer on {base} within {timeout_s:.0f}s (log: {log_path})")


def stop_server(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop the server and the workers it started (its own process group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout_s)


def _describe(latest: LatestRun | None, training: LatestRun | None, base: str) -> list[str]:
    if latest is None:
        return ["[vitray] no runs in this store yet"]
    lines = []
    if training is not None:
        lines.append(f"[vitray] latest training run {training.name or training.run_id} ({training.status}, experiment "
                     f"{training.experiment!r}): {run_url(base, training.experiment_id, training.run_id)}")
    if training is None or training.run_id != latest.run_id:
        lines.append(f"[vitray] latest run {latest.name or latest.run_id} ({latest.status}, experiment "
                     f"{latest.experiment!r}): {run_url(base, latest.experiment_id, latest.run_id)}")
    return lines


def run_ui(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000) -> int:
    """The ``vitray ui`` command: print where to look, serve until Ctrl-C (a local store) or return (a server)."""
    if tracking_uri.startswith(("http://", "https://")):
        check_reachable(tracking_uri)
        print(f"[vitray] {tracking_uri} is an MLflow server already: open it there")
        for line in _describe(*latest_runs(tracking_uri), tracking_uri):
            print(line)
        return 0
    found = latest_runs(tracking_uri)  # before the server starts: a bad store fails in a second, with its name
    proc, base, log_path = start_server(tracking_uri, host, port)
    print(f"[vitray] MLflow UI on {base} for {tracking_uri} (server log: {log_path})", flush=True)
    for line in _describe(*found, base):
        print(line, flush=True)
    print("[vitray] Ctrl-C to stop", flush=True)
    try:
        while proc.poll() is None:
            time.sleep(0.5)
        print(f"[vitray] mlflow server exited with code {proc.returncode} (log: {log_path})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)
