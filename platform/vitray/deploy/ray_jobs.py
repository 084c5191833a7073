"""Ray job submission: ``vitray submit`` and ``vitray jobs`` against a Ray cluster's job server (port 8265).

A submission uploads a working directory holding the resolved run config (``run.yaml``) and, unless the cluster's
image already has the right vitray (``--no-package``), the local vitray package as a ``py_modules`` entry, so the
driver runs exactly the code and config that were submitted. The entrypoint is the CLI command the local run
would use, connected to the cluster (``--address auto``).

Token authentication (on by default for clusters of Ray >= 2.52): the token comes from ``--token-file``,
``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, in that order, and travels as
``Authorization: Bearer``.
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from vitray import storage
from vitray.config import ConfigError, RunConfig

__all__ = ["JobsError", "DEFAULT_ADDRESS", "TERMINAL", "job_address", "auth_token", "connect", "submit",
           "follow_logs", "wait", "SubmitResult"]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """The job server could not be reached or refused a request: one line for the CLI (exit 1)."""


def job_address(address: str | None) -> str:
    """--address, else $RAY_ADDRESS when it is an http(s) URL, else the local dashboard."""
    if not address:  # $RAY_ADDRESS only when it is the job server's URL (inside Ray pods it is HOST:6379, the GCS)
        env = os.environ.get("RAY_ADDRESS", "")
        address = env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS
    if address.startswith("ray://") or "://" not in address and address != "auto":
        raise ConfigError(f"--address {address}: the job server's HTTP address is needed, e.g. http://HEAD:8265 "
                          "(ray:// is the Ray Client port, not the job server)")
    if address == "auto":
        return DEFAULT_ADDRESS
    return address.rstrip("/")


def auth_token(token_file: str | None = None) -> str | None:
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise ConfigError(f"--token-file {token_file}: missing or empty")
        return path.read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for cand in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if cand and Path(cand).expanduser().is_file():
            text = Path(cand).expanduser().read_text().strip()
            if text:
                return text
    return None


def connect(address: str | None = None, token_file: str | None = None):
    """A JobSubmissionClient for the cluster, with the bearer token when one is found."""
    import logging

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed" per job
    address = job_address(address)
    token = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise JobsError(_explain(err, address)) from None
    except ConnectionError:
        raise JobsError(f"cannot reach the Ray job server at {address}: is the cluster up and the dashboard port "
                        "(8265) reachable? (`ray start --head` serves it; on Kubernetes port-forward the head "
                        "service)") from None
    except RuntimeError as err:
        raise JobsError(_explain(err, address)) from None


def _explain(err: Exception, address: str) -> str:
    text = str(err).splitlines()[0][:400]
    if "401" in text or "Unauthorized" in text or "Missing authentication token" in text:
        return (f"the Ray cluster at {address} requires a token: set RAY_AUTH_TOKEN or pass --token-file "
                "(`ray get-auth-token` on the head prints it)")
    if "403" in text or "Forbidden" in text or "Invalid authentication token" in text:
        return f"the Ray cluster at {address} refused the token (403): check RAY_AUTH_TOKEN / --token-file"
    return f"Ray job server at {address}: {text}"


def call(fn, address: str, what: str = ""):
    """Run one client call, turning Ray's RuntimeErrors into one-line errors (unknown job id: exit 2)."""
    from ray.exceptions import AuthenticationError

    try:
        return fn()
    except AuthenticationError as err:
        raise JobsError(_explain(err, address)) from None
    except RuntimeError as err:
        text = str(err)
        if "404" in text.splitlines()[0] or "does not exist" in text:
            raise ConfigError(f"no job {what} at {address}") from None
        raise JobsError(_explain(err, address)) from None


@dataclass
class SubmitResult:
    submission_id: str
    address: str
    workload: str
    forwarded: tuple[str, ...] = ()  # object storage variables handed to the job (names only: values never shown)


def _package_dir() -> Path:
    import vitray

    return Path(vitray.__file__).resolve().parent


def stage(cfg: RunConfig, workload: str, dest: Path) -> Path:
    """The uploaded working dir: the resolved run config (the kubernetes section stays behind)."""
    dest.mkdir(parents=True, exist_ok=True)
    data = cfg.model_dump(mode="json", exclude={"kubernetes"})
    (dest / "run.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


def submit(cfg: RunConfig, workload: str, *, address: str | None = None, token_file: str | None = None,
           env: dict[str, str] | None = None, package: bool = True, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, tracking_uri: str | None = None) -> SubmitResult:
    """Submit a training or scoring run as a Ray job; returns at once (``wait`` follows it)."""
    if workload not in ("train", "score"):
        raise ConfigError(f"--workload {workload}: vitray submit runs train or score jobs (serve on a cluster: "
                          "vitray serve --address auto, or a RayService through vitray k8s)")
    client = connect(address, token_file)
    address = job_address(address)
    env_vars = {"PYTHONUNBUFFERED": "1", **(env or {})}
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and not cfg.tracking.uri:
        env_vars.setdefault("MLFLOW_TRACKING_URI", uri)
    forwarded = storage.forwarded_env()  # credentials and endpoints for s3:// and gs:// paths, as set here
    for key, value in forwarded.items():
        env_vars.setdefault(key, value)
    submission_id = submission_id or f"vitray-{workload}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="vitray-submit-") as tmp:
        workdir = stage(cfg, workload, Path(tmp) / "job")
        runtime_env: dict = {"working_dir": str(workdir), "env_vars": env_vars}
        if package:
            pkg = Path(tmp) / "pkg" / "vitray"
            shutil.copytree(_package_dir(), pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            runtime_env["py_modules"] = [str(pkg)]
        entrypoint = f"python -m vitray.cli {workload} run.yaml --address auto"
        metadata = {"vitray.workload": workload, "vitray.experiment": cfg.tracking.experiment,
                    "vitray.submitted_by": os.environ.get("USER", "")}
        call(lambda: client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata,
                                       submission_id=submission_id, entrypoint_num_cpus=entrypoint_num_cpus),
             address)
    return SubmitResult(submission_id, address, workload, tuple(sorted(forwarded)))


def follow_logs(client, submission_id: str, out=sys.stdout) -> None:
    """Stream the job's logs until it ends (the job server closes the stream at a terminal state)."""
    async def _tail():
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(_tail())


def wait(client, submission_id: str, address: str, poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Block until the job is terminal; its final status."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    while True:
        status = str(call(lambda: client.get_job_status(submission_id), address, submission_id))
        status = status.rsplit(".", 1)[-1]
        if status in TERMINAL:
            return status
        if deadline is not None and time.time() > deadline:
            raise JobsError(f"job {submission_id} still {status} after {timeout_s:.0f}s (it keeps running; "
                            f"vitray jobs stop {submission_id} --address {address})")
        time.sleep(poll_s)
