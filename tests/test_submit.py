"""`vitray submit` and `vitray jobs` against a real Ray cluster that the test starts the way a user does
(`ray start --head` on 127.0.0.1, its own temp dir and ports, token authentication on as Ray 2.60 sets it up),
separate from the session's in-process cluster and stopped by its process group at the end."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


HEAD: dict = {}  # the module head's GCS port, temp dir and ray binary, for tests that add a node to it


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="vtr", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    ray = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
         f"--metrics-export-port={metrics}", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": ""})
    address = f"http://127.0.0.1:{dash}"
    HEAD.update(gcs=gcs, temp=temp, ray=ray, address=address)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if run_cli("jobs", "list", "--address", address, timeout=60).returncode == 0:
                break
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited with {proc.returncode}")
            time.sleep(2)
        else:
            pytest.fail("the Ray head's job server did not answer within 120 s")
        yield address
    finally:
        # the head and every process it started (one process group), nothing else: TERM, then KILL what is left
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def _config(tmp_path: Path, digits: str, data_path: str | None = None) -> Path:
    cfg = {"model": {"name": "vit_pico_patch4_32", "num_classes": 10, "pos_embed": "sincos"},
           "data": {"path": data_path or digits, "batch_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
           "train": {"steps": 6, "warmup_steps": 1, "log_every_steps": 2},
           "cluster": {"num_workers": 1, "storage_path": str(tmp_path / "runs")},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "submitted"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_submit_wait_succeeds_with_epoch_lines_and_jobs_status_agrees(ray_head, digits, tmp_path):
    res = run_cli("submit", str(_config(tmp_path, digits)), "--address", ray_head, "--wait",
                  "--submission-id", "vitray-test-ok", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[vitray] epoch 1/1 done: val/loss" in res.stdout, res.stdout[-3000:]
    assert "[vitray] job vitray-test-ok SUCCEEDED" in res.stdout
    status = run_cli("jobs", "status", "vitray-test-ok", "--address", ray_head)
    assert status.returncode == 0 and status.stdout.startswith("vitray-test-ok: SUCCEEDED"), status.stdout
    listed = run_cli("jobs", "list", "--address", ray_head)
    assert any(line.split()[:2] == ["vitray-test-ok", "SUCCEEDED"] for line in listed.stdout.splitlines())
    logs = run_cli("jobs", "logs", "vitray-test-ok", "--address", ray_head)
    assert "epoch 1/1 done" in logs.stdout
    assert list((tmp_path / "runs").glob("*/export/model.safetensors")), "the job's run storage holds no export"


def test_submit_forwards_object_storage_credentials_to_a_cluster_that_has_none(ray_head, tmp_path):
    """The head was started without any AWS variable: the job reads its shards from and writes its run into an S3
    bucket (a real S3 API server on 127.0.0.1, tests/s3_server.py) only because `vitray submit` forwarded the
    endpoint and credentials it saw, in the job's runtime env, naming them without their values."""
    from s3_server import s3_server

    from vitray import storage
    from vitray.data.pack import pack

    # nor does this process, or the head, have any credentials or endpoint
    assert not [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE")
                if k in os.environ]
    with s3_server() as s3:
        bucket = s3.create_bucket("submitted")
        with pytest.MonkeyPatch.context() as mp:
            for key, value in s3.env.items():
                mp.setenv(key, value)
            pack("-", f"{bucket}/digits", "sklearn-digits", progress=False)
            cfg = yaml.safe_load(_config(tmp_path, "unused").read_text())
            cfg["data"]["path"] = f"{bucket}/digits"
            cfg["cluster"]["storage_path"] = f"{bucket}/runs"
            cfg["cluster"]["run_name"] = "from-s3"
            (tmp_path / "s3.yaml").write_text(yaml.safe_dump(cfg))
            res = run_cli("submit", str(tmp_path / "s3.yaml"), "--address", ray_head, "--wait",
                          "--submission-id", "vitray-test-s3", env=s3.env, timeout=600)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
            (line,) = [x for x in res.stdout.splitlines() if "forwarded to the job's environment: " in x]
            names = set(line.split(": ", 1)[1].removesuffix(" (values not shown)").split(", "))
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"} <= names
            assert s3.env["AWS_SECRET_ACCESS_KEY"] not in res.stdout + res.stderr
            assert storage.is_file(f"{bucket}/runs/from-s3/export/model.safetensors")


def test_a_config_that_fails_on_the_cluster_ends_failed_with_a_nonzero_exit(ray_head, digits, tmp_path):
    """Valid here, fails there: data.path does not exist where the driver runs."""
    res = run_cli("submit", str(_config(tmp_path, digits, str(tmp_path / "no-shards"))), "--address", ray_head,
                  "--wait", "--submission-id", "vitray-test-bad", timeout=300)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "[vitray] job vitray-test-bad FAILED" in res.stdout and "no manifest.json" in res.stdout
    status = run_cli("jobs", "status", "vitray-test-bad", "--address", ray_head)
    assert status.stdout.startswith("vitray-test-bad: FAILED"), status.stdout


def test_usage_and_auth_errors_are_one_line(ray_head, digits, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    res = run_cli("submit", str(bad), "--address", ray_head)
    assert res.returncode == 2 and "train.epochz" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("jobs", "status", "no-such-job", "--address", ray_head)
    assert res.returncode == 2 and "no job no-such-job" in res.stderr
    res = run_cli("jobs", "list", "--address", ray_head, env={"RAY_AUTH_TOKEN": "not-the-token"})
    assert res.returncode == 1 and "refused the token" in res.stderr and "Traceback" not in res.stderr
    token = tmp_path / "token"
    token.write_text("")
    res = run_cli("jobs", "list", "--address", ray_head, "--token-file", str(token))
    assert res.returncode == 2 and "--token-file" in res.stderr


def test_jobs_stop_stops_a_running_job(ray_head, digits, tmp_path):
    cfg = yaml.safe_load(_config(tmp_path, digits).read_text())
    cfg["train"]["steps"] = 100_000  # would run for hours
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli("submit", str(path), "--address", ray_head, "--submission-id", "vitray-test-stop")
    assert res.returncode == 0 and "vitray jobs logs vitray-test-stop --follow" in res.stdout, res.stderr
    stop = run_cli("jobs", "stop", "vitray-test-stop", "--address", ray_head)
    assert stop.returncode == 0 and stop.stdout.startswith("vitray-test-stop: "), stop.stderr
    deadline = time.time() + 120
    while time.time() < deadline:
        status = run_cli("jobs", "status", "vitray-test-stop", "--address", ray_head).stdout
        if not status.startswith(("vitray-test-stop: PENDING", "vitray-test-stop: RUNNING")):
            break
        time.sleep(2)
    assert status.startswith("vitray-test-stop: STOPPED"), status


# ------------------------------------------------------------------------------------------ resource planning
def _starved_config(tmp_path: Path, digits: str) -> Path:
    cfg = yaml.safe_load(_config(tmp_path, digits).read_text())
    cfg["cluster"]["num_workers"] = 2  # 2 trainers x 1 CPU: every CPU of the 2-CPU head
    cfg["tracking"] = {"enabled": False}  # with a second node (below), a sqlite file on this machine is refused
    path = tmp_path / "two-workers.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_scoring_whose_actors_take_every_cpu_fails_fast(ray_head, digits, tmp_path):
    import torch

    from vitray.models import create_model
    from vitray.models.export import save_export

    arch = {"name": "vit_pico_patch4_28", "num_classes": 10, "img_size": 28, "pos_embed": "learned",
            "global_pool": "token", "in_chans": 3}
    torch.manual_seed(0)
    model = create_model(arch["name"], num_classes=10)
    export = save_export(tmp_path / "export", model.state_dict(), model=arch, task="classification",
                         class_names=[str(i) for i in range(10)],
                         preprocessing={"img_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                                        "interpolation": "bicubic"})
    cfg = {"score": {"model": str(export), "input": digits, "output": str(tmp_path / "preds"), "concurrency": 2},
           "tracking": {"enabled": False}}
    path = tmp_path / "score.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    res = run_cli("submit", str(path), "--address", ray_head, "--workload", "score", "--wait",
                  "--submission-id", "vitray-test-score-starved", timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "2 predictor actors x 1 CPU reserve 2, which leaves 0 CPU for Ray Data" in out, out[-3000:]
    assert "score.concurrency or score.cpus_per_actor" in out and "Traceback" not in out
    assert time.monotonic() - t0 < 60  # the bound: fails within a minute instead of hanging


def _worker_auth() -> dict:
    """A joining node speaks the head's auth mode. A head started where ~/.ray/auth_token already exists runs with
    token auth, and a plain `ray start --address` then fails with "RAY_AUTH_MODE is currently 'disabled'"; a
    token-mode node also joins a head without auth (seen here), so token mode whenever the token file is there."""
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return {"RAY_AUTH_MODE": "token"} if token.is_file() else {}


def test_training_that_takes_every_cpu_fails_fast_and_runs_with_a_third_cpu(ray_head, digits, tmp_path):
    """The issue's case with Ray's own tools: `ray start --head --num-cpus=2`, 2 trainers x 1 CPU. vitray exits 1
    within a minute with the numbers and the fields to change; after a 1-CPU worker node joins (the third CPU) the
    same submission trains to the end."""
    path = _starved_config(tmp_path, digits)
    t0 = time.monotonic()
    res = run_cli("submit", str(path), "--address", ray_head, "--wait", "--submission-id", "vitray-test-starved",
                  timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out[-3000:]
    assert "[vitray] resources: cluster 2 CPU, 0 GPU (fixed size); 2 trainers x 1 CPU reserve 2 CPU; Ray Data gets " \
           "0 CPU" in out, out[-3000:]
    assert "leaves 0 CPU for Ray Data's read and decode tasks" in out
    assert "Change cluster.num_workers or cluster.cpus_per_worker" in out and "Traceback" not in out
    assert time.monotonic() - t0 < 60
    agent, agent_grpc, env_agent, metrics = _free_ports(4)
    node = subprocess.Popen(
        [HEAD["ray"], "start", "--block", f"--address=127.0.0.1:{HEAD['gcs']}", "--node-ip-address=127.0.0.1",
         "--num-cpus=1", f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu", "RAY_ADDRESS": "", **_worker_auth()})
    try:
        deadline = time.time() + 90
        status = ""
        while time.time() < deadline:
            status = subprocess.run([HEAD["ray"], "status", f"--address=127.0.0.1:{HEAD['gcs']}"], capture_output=True,
                                    text=True, env={**os.environ, "RAY_AUTH_MODE": "token"}).stdout
            if "/3.0 CPU" in status:
                break
            assert node.poll() is None, "the worker node exited"
            time.sleep(2)
        else:
            pytest.fail(f"the worker node did not join within 90 s: {status[-1000:]}")
        res = run_cli("submit", str(path), "--address", ray_head, "--wait", "--submission-id", "vitray-test-3cpu",
                      timeout=600)
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        assert "2 trainers x 1 CPU reserve 2 CPU; Ray Data gets 1 CPU" in out and "epoch 1/1 done" in out
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(20)
