"""Shared fixtures. Heavy shared resources (one Ray cluster per session) live here so tests never start their own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
# Ray adds a "module" filter for RayDeprecationWarning when it is first imported; imported here, before any test,
# that filter sits behind the per-test filters of pyproject.toml (deprecations from vitray's calls are errors)
import ray.util.annotations  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU on the test machines
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: str | Path | None = None):
    """Run the real `vitray` console script in a subprocess; returns CompletedProcess with text output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(autouse=True)
def _vitray_home(tmp_path, monkeypatch):
    """Every test gets its own vitray home: no test reads or writes ~/.vitray."""
    monkeypatch.setenv("VITRAY_HOME", str(tmp_path / "vitray-home"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole test session, pinned to loopback, no dashboard."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on 2 cores, as `vitray train` starts a local Ray: 2 trainer workers + room for Ray Data
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False,
                 # tests/ on the workers path: test-defined Ray Train loops are pickled by reference
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore",
                                           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}})
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
    yield ray
    # left running until the interpreter exits: other session-scoped users may still need it


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    """scikit-learn's bundled digits packed into shards once per session (1,602 train / 195 val)."""
    from vitray.data.pack import pack

    out = tmp_path_factory.mktemp("digits") / "shards"
    pack("-", str(out), "sklearn-digits", val_fraction=0.1, progress=False)
    return str(out)
