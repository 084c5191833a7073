"""MLflow tracking and the model registry, against a real `mlflow server` process (sqlite backend, 127.0.0.1, a free
port) started here, and against the embedded sqlite store. Training runs on the session's real local Ray."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from recipes import make_cfg, read_log

ROOT = Path(__file__).resolve().parents[1]
DESIGN_METRICS = {"train/loss", "train/lr", "train/images_per_s", "val/loss", "val/top1", "val/top5", "epoch", "step"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process group (it forks workers), so the test can kill all of it. Starting is
    split from waiting so two servers come up side by side (each takes ~15 s here)."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
             "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float = 120) -> "MlflowServer":
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"mlflow server did not become healthy in {timeout_s} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group only
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The module's server, and a second one that a test kills mid-run."""
    up = [MlflowServer(tmp_path_factory.mktemp("mlflow-server")), MlflowServer(tmp_path_factory.mktemp("mlflow-doomed"))]
    try:
        yield [s.wait_healthy() for s in up]
    finally:
        for s in up:
            s.kill()


@pytest.fixture(scope="module")
def mlflow_server(servers):
    return servers[0].uri


@pytest.fixture(scope="module")
def server_run(ray_cluster, digits, mlflow_server, tmp_path_factory):
    """One tiny training run (1 epoch = 12 steps, 2 workers, ZeRO-2) tracked on the server, registered as digits-srv."""
    from vitray.train import run_training

    tmp = tmp_path_factory.mktemp("server-run")
    cfg = make_cfg(digits, tmp, train={"epochs": 1, "log_every_steps": 4},
                   tracking={"enabled": True, "uri": mlflow_server, "experiment": "tests",
                             "registered_model": "digits-srv", "flush_interval_s": 1.0, "image_grid": 8})
    return cfg, run_training(cfg)


def val_images(digits: str, n: int = 48) -> tuple[list[bytes], np.ndarray]:
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

    f = Manifest.read(digits).files(digits, "val")[0]
    t = pq.read_table(f, columns=["image", "label"])
    return t.column("image").to_pylist()[:n], np.asarray(t.column("label"))[:n]


# ------------------------------------------------------------------------------------------- the tracked run
@pytest.mark.slow
def test_run_logs_params_design_metrics_config_tags_and_pictures(server_run, mlflow_server, digits):
    import yaml
    from vitray.tracking.uris import client_for
    from PIL import Image

    cfg, result = server_run
    client = client_for(mlflow_server)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "vit_pico_patch4_32" and params["train.epochs"] == "1"
    assert params["deepspeed.zero_stage"] == "2" and params["tracking.registered_model"] == "digits-srv"
    assert DESIGN_METRICS <= set(run.data.metrics)
    assert run.data.metrics["val/top1"] == pytest.approx(result.metrics["val/top1"])
    # every logged step reached MLflow, in order, with the values of the run's own log
    logged = [r for r in read_log(result.run_dir) if "train/loss" in r]
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [r["step"] for r in logged] == [4, 8, 12]
    assert [m.value for m in history] == pytest.approx([r["train/loss"] for r in logged])
    # batched: far fewer requests than scalars
    closed = [r for r in read_log(result.run_dir) if r.get("event") == "tracking_closed"][0]
    scalars = sum(len(client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics)
    assert closed["unsent"] == 0 and closed["requests"] < scalars / 2, (closed, scalars)

    tags = run.data.tags
    manifest = Path(digits) / "manifest.json"
    assert tags["vitray.data.manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert tags["vitray.checkpoint_path"] == result.run_dir and tags["vitray.export_dir"] == result.export_dir
    assert tags["ray.job_id"] and tags["vitray.version"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # CI runs on a clone
        assert tags["vitray.git_commit"] == head.stdout.strip()

    dest = Path(client.download_artifacts(run.info.run_id, "", str(Path(result.run_dir) / "dl")))
    logged_cfg = yaml.safe_load((dest / "config.yaml").read_text())
    assert logged_cfg == json.loads(json.dumps(cfg.model_dump(mode="json")))
    for name in ("confusion_matrix.png", "val_predictions.png"):
        with Image.open(dest / "pictures" / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
    # the matrix behind the picture is summed over both workers' val shares: every val image once, top-1 its trace
    counts = np.array(json.loads((dest / "pictures" / "confusion_matrix.json").read_text())["rows_true_cols_predicted"])
    assert counts.shape == (10, 10) and counts.sum() == 195
    assert np.trace(counts) / 195 == pytest.approx(result.metrics["val/top1"])
    # resume state stays in run storage: no DeepSpeed shards in MLflow
    assert not list(dest.rglob("*optim_states*")) and not list(dest.rglob("mp_rank_*"))


@pytest.mark.slow
def test_registered_pyfunc_matches_the_export_and_the_gate_orders_versions(server_run, mlflow_server, digits, cli,
                                                                           tmp_path, capsys):
    import mlflow
    import pandas as pd
    from vitray.tracking.uris import client_for
    from PIL import Image

    from vitray.predict import Predictor
    from vitray.tracking import load_model, tracking_scope

    cfg, result = server_run
    client = client_for(mlflow_server)
    assert result.registration.version == "1" and result.registration.alias == "champion"
    mv = client.get_model_version_by_alias("digits-srv", "champion")
    assert mv.version == "1" and mv.tags["vitray.run_id"] == result.mlflow_run_id
    assert float(mv.tags["metric.val/top1"]) == pytest.approx(result.metrics["val/top1"])
    assert mv.tags["vitray.checkpoint_path"] == result.run_dir

    with tracking_scope(mlflow_server):  # not mlflow.set_tracking_uri: it would leak into later tests' defaults
        pyfunc = mlflow.pyfunc.load_model("models:/digits-srv@champion")
    schema = pyfunc.metadata.get_input_schema()
    assert schema.input_names() == ["image"] and str(schema.input_types()[0]) == "DataType.binary"
    assert pyfunc.metadata.saved_input_example_info is not None
    images, labels = val_images(digits)
    out = pyfunc.predict(pd.DataFrame({"image": images}))
    direct = Predictor.from_export(result.export_dir).probabilities(images)
    probs = np.stack(out["probs"].to_numpy())
    assert np.abs(probs - direct).max() <= 1e-5
    assert (out["label"].to_numpy() == direct.argmax(1)).all()
    assert list(out["name"][:3]) == [str(i) for i in direct.argmax(1)[:3]]  # digits' class names are "0".."9"
    decoded = [np.asarray(Image.open(__import__("io").BytesIO(b)).convert("RGB")) for b in images]
    probs_arr = np.stack(pyfunc.predict(pd.DataFrame({"image": decoded}))["probs"].to_numpy())
    assert np.abs(probs_arr - direct).max() <= 1e-5

    # the one loader: registry alias, version, run URI and the local folder give the same weights
    ref = Predictor.from_export(result.export_dir).model.state_dict()
    for uri in ("models:/digits-srv@champion", "models:/digits-srv/1", f"runs:/{result.mlflow_run_id}/model",
                result.export_dir):
        model, meta = load_model(uri, mlflow_server)
        assert meta["class_names"] == [str(i) for i in range(10)]
        assert all(np.array_equal(v.numpy(), ref[k].numpy()) for k, v in model.state_dict().items())

    # the gate, through `vitray models register`: a worse model -> challenger, a better one -> champion
    # (the first through the real console script; the rest call the same CLI in-process to keep the suite fast)
    from vitray.cli import main

    top1 = result.metrics["val/top1"]
    assert top1 < 0.999
    for name, value in (("worse", top1 - 0.05), ("better", top1 + 0.001)):
        folder = tmp_path / name
        shutil.copytree(result.export_dir, folder)
        meta = json.loads((folder / "vitray_model.json").read_text())
        meta["metrics"]["val/top1"] = value
        (folder / "vitray_model.json").write_text(json.dumps(meta))
        if name == "worse":  # no --name: the export's own tracking.registered_model (digits-srv)
            res = cli("models", "register", str(folder), "--tracking-uri", mlflow_server)
            assert res.returncode == 0 and "@challenger" in res.stdout, res.stderr
        else:
            assert main(["models", "register", str(folder), "--name", "digits-srv", "--tracking-uri", mlflow_server]) == 0
    assert client.get_model_version_by_alias("digits-srv", "challenger").version == "2"
    assert client.get_model_version_by_alias("digits-srv", "champion").version == "3"
    assert "does not beat champion v1" in client.get_model_version("digits-srv", "2").tags["vitray.gate"]

    capsys.readouterr()
    assert main(["models", "show", "digits-srv", "--tracking-uri", mlflow_server]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {"1", "2", "3"} and "champion" in rows["3"] and "challenger" in rows["2"]
    assert main(["models", "list", "--tracking-uri", mlflow_server]) == 0
    listed = capsys.readouterr().out
    assert "digits-srv" in listed and "v3" in listed
    assert main(["models", "promote", "digits-srv", "1", "--alias", "champion", "--tracking-uri", mlflow_server]) == 0
    assert "(was v3)" in capsys.readouterr().out
    assert client.get_model_version_by_alias("digits-srv", "champion").version == "1"
    assert main(["models", "promote", "digits-srv", "9", "--alias", "champion", "--tracking-uri", mlflow_server]) == 2
    assert "digits-srv v9" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- failures
def test_unreachable_server_fails_the_command_before_training(cli, digits, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{name: vit_pico_patch4_32, num_classes: 10}}\ndata: {{path: {digits}}}\ntrain: {{epochs: 1}}\n"
                   f"cluster: {{storage_path: {tmp_path / 'runs'}}}\n")
    dead = f"http://127.0.0.1:{free_port()}"
    res = cli("train", str(cfg), "--set", f"tracking.uri={dead}", timeout=120)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"MLflow tracking server {dead} is unreachable" in res.stderr and "tracking.enabled=false" in res.stderr
    assert "Traceback" not in res.stderr and "[vitray] run " not in res.stdout and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_server_killed_mid_run_training_finishes_and_export_can_be_registered_later(
        ray_cluster, digits, servers, tmp_path, cli):
    from vitray.tracking.uris import client_for
    from vitray.train import run_training

    mlflow_server, doomed = servers[0].uri, servers[1]
    cfg = make_cfg(digits, tmp_path, train={"epochs": 1, "log_every_steps": 2},
                   cluster={"run_name": "doomed"},
                   tracking={"enabled": True, "uri": doomed.uri, "registered_model": "digits-doomed",
                             "flush_interval_s": 0.5})
    log = tmp_path / "runs" / "doomed" / "metrics.jsonl"
    killed_at: list[int] = []

    def kill_when_training():  # the server dies once the run has logged its first steps
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = [json.loads(x).get("step", 0) for x in log.read_text().splitlines()] if log.exists() else []
            if steps and max(steps) >= 4:
                killed_at.append(max(steps))
                doomed.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_when_training, daemon=True)
    watcher.start()
    result = run_training(cfg)
    watcher.join(timeout=5)
    assert killed_at and killed_at[0] < 12
    assert result.metrics["step"] == 12  # the whole epoch
    export = Path(result.export_dir)
    assert (export / "model.safetensors").is_file() and (export / "vitray_model.json").is_file()
    assert result.registration is None and f"vitray models register {result.export_dir}" in result.tracking_warning
    records = read_log(result.run_dir)
    assert [r["step"] for r in records if r.get("event") == "epoch_end"] == [12]
    assert [r for r in records if r.get("event") == "tracking_closed"][0]["unsent"] > 0

    # registration redone later, from the export, on a server that is up
    res = cli("models", "register", str(export), "--name", "digits-recovered", "--tracking-uri", mlflow_server)
    assert res.returncode == 0, res.stderr
    mv = client_for(mlflow_server).get_model_version_by_alias("digits-recovered", "champion")
    assert float(mv.tags["metric.val/top1"]) == pytest.approx(result.metrics["val/top1"])


# ------------------------------------------------------------------------------ logger and gate, no training
def test_logger_never_raises_and_reports_what_it_could_not_send(tmp_path, monkeypatch):
    from vitray.tracking.logger import RunLogger

    for key in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):  # the logger sets them for its process
        monkeypatch.setenv(key, os.environ.get(key, "7" if "RETRIES" in key else "120"))

    logger = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, flush_interval_s=0.1, request_timeout_s=2)
    for step in range(1, 51):
        logger.log_metrics({"train/loss": 1.0 / step, "step": step}, step)
    logger.log_params({"a": 1})
    logger.log_text("x: 1\n", "config.yaml")
    time.sleep(0.5)
    assert logger.close(timeout_s=10) is False and logger.pending() == 100 + 1 + 1


def test_gate_min_mode_and_missing_metric_on_the_embedded_store(tmp_path):
    """Registration on the embedded default (sqlite under the vitray home, no server): the gate compares with the
    champion in the configured direction and never promotes a version that lacks the metric."""
    import torch
    from vitray.tracking.uris import client_for

    from vitray.config import TrackingConfig
    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.tracking import default_tracking_uri
    from vitray.tracking.registry import log_and_register

    torch.manual_seed(0)
    model = create_model("vit_pico_patch4_28", num_classes=3)
    arch = {"name": "vit_pico_patch4_28", "num_classes": 3, "img_size": 28, "pos_embed": "learned",
            "global_pool": "token", "in_chans": 3}
    pre = {"img_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}
    cfg = TrackingConfig(registered_model="tiny", promotion_metric="val/loss", promotion_mode="min")
    decisions = []
    for i, metrics in enumerate(({"val/loss": 0.5}, {"val/loss": 0.7}, {"val/loss": 0.4}, {})):
        folder = save_export(tmp_path / f"e{i}", model.state_dict(), model=arch, task="classification",
                             class_names=["a", "b", "c"], preprocessing=pre, metrics=metrics)
        reg = log_and_register(str(folder), cfg)
        decisions.append((reg.version, reg.alias))
    assert decisions == [("1", "champion"), ("2", "challenger"), ("3", "champion"), ("4", "challenger")]
    uri = default_tracking_uri()
    assert uri.startswith("sqlite:///") and str(tmp_path) in uri  # the per-test vitray home
    assert str(client_for(uri).get_model_version_by_alias("tiny", "champion").version) == "3"
