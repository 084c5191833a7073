"""Object storage end to end: shards, checkpoints, the export, MLflow artifacts and scoring output in an S3 bucket.

The bucket is served by a real S3 API server on 127.0.0.1 (moto's server mode, tests/s3_server.py), reached over
HTTP through pyarrow's S3 filesystem and boto3 with the standard ``AWS_ENDPOINT_URL`` override, as MinIO or AWS
would be. Only the cloud is stood in for: the Ray cluster, DeepSpeed, MLflow (sqlite store, artifacts in the
bucket) and the `vitray` commands are the real ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from imagegen import make_digits_folder
from killing import run_and_kill_midway
from s3_server import s3_server

BUCKET = "vitray-test"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    """This process talks to the server as any AWS client would: through the standard environment."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3


def _cli(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitray.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_pack_into_a_bucket_verifies_reads_back_and_catches_a_damaged_shard(s3_env, tmp_path):
    from vitray import storage
    from vitray.config import DataConfig
    from vitray.data.inspection import summarize, verify
    from vitray.data.pack import PackError, pack
    from vitray.data.pipeline import dataset_spec

    src = tmp_path / "digits"
    good = make_digits_folder(src, bad=3)  # sorted by class, mixed sizes, 3 broken files
    uri = f"s3://{BUCKET}/packs/digits"
    m = pack(str(src), uri, "imagefolder", shard_rows=300, progress=False)
    assert sum(m.counts.values()) == len(good) and len(m.skipped) == 3
    objects = dict(storage.list_files(uri))
    names = {storage.basename(p) for p in objects}
    assert names == {"manifest.json"} | {s.file for s in m.shards}  # nothing else: no temporary upload left
    for s in m.shards:  # the sha256 computed while writing is the stored object's
        assert storage.sha256_of(f"{uri}/{s.file}") == s.sha256 and objects[f"{uri}/{s.file}"] == s.bytes
    assert verify(uri) == []
    assert f"{uri}: task classification, 10 classes" in summarize(uri)

    # the same folder packed locally holds the same rows, so a bucket is just another place for the shards
    local = pack(str(src), str(tmp_path / "local"), "imagefolder", shard_rows=300, progress=False)
    assert [s.sha256 for s in local.shards] == [s.sha256 for s in m.shards]
    spec = dataset_spec(DataConfig(path=uri))
    assert spec.counts == m.counts and all(f.startswith(uri + "/") for f in spec.files["train"])
    ids = [i for f in spec.files["train"] + spec.files["val"] for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]
    assert sorted(ids) == sorted(good)

    with pytest.raises(PackError, match="not empty"):
        pack(str(src), uri, "imagefolder", progress=False)
    damaged = f"{uri}/{m.shards[0].file}"
    data = bytearray(storage.read_bytes(damaged))
    data[len(data) // 2] ^= 0xFF
    storage.write_bytes(damaged, bytes(data))
    (problem,) = verify(uri)
    assert problem.startswith(f"{m.shards[0].file}: sha256")
    assert not (src / "_pack_tmp").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["digits", "local"]


def test_bad_bucket_missing_credentials_and_wrong_endpoint_fail_in_one_line_before_ray(s3, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(VITRAY_HOME=str(tmp_path / "home"), PYTHONWARNINGS="ignore",
                AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                AWS_EC2_METADATA_DISABLED="true")
    good = {**base, **s3.env}
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"path": "s3://no-such-bucket/shards"}, "tracking": {"enabled": False}}))
    no_creds = {k: v for k, v in good.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    wrong_endpoint = {**good, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # nothing listens on the discard port
    cases = [
        (["data", "inspect", "s3://no-such-bucket/shards"], good, "bucket 'no-such-bucket' does not exist"),
        (["train", str(cfg)], good, "data.path: s3://no-such-bucket/shards: bucket 'no-such-bucket' does not exist"),
        (["data", "inspect", f"s3://{BUCKET}/shards"], no_creds, "no AWS credentials found"),
        (["score", "--model", str(tmp_path), "--input", f"s3://{BUCKET}/in", "--output", str(tmp_path / "out")],
         wrong_endpoint, "cannot reach the object store at AWS_ENDPOINT_URL=http://127.0.0.1:9"),
    ]
    for args, env, message in cases:
        res = _cli(args, env, timeout=120)
        assert res.returncode == 2, (args, res.stdout[-1500:], res.stderr[-1500:])
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr and "Started a local Ray" not in res.stdout + res.stderr
    assert not (tmp_path / "out").exists()


def test_weights_and_teachers_given_as_bucket_uris_are_fetched_and_a_missing_one_is_named(s3_env, tmp_path):
    """``model.checkpoint`` / ``train.distillation.teacher`` as an export folder or a weights file in a bucket: checked
    before any cluster work, then fetched to local temporary files on the driver (and again on a worker's node)."""
    import hashlib

    from vitray import storage
    from vitray.config import ConfigError, check_config, parse_config
    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.train.trainer import _resolve_weights

    arch = {"name": "vit_pico_patch4_32", "num_classes": 10, "img_size": 32}
    folder = save_export(tmp_path / "export", create_model(arch["name"], num_classes=10).state_dict(), model=arch,
                         task="classification", class_names=[str(i) for i in range(10)],
                         preprocessing={"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                                        "interpolation": "bicubic"})
    uri = f"s3://{BUCKET}/models/pico"
    storage.upload_dir(folder, uri)
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 10, "checkpoint": uri},
                        "train": {"distillation": {"teacher": f"{uri}/model.safetensors"}}})
    check_config(cfg)
    local = _resolve_weights(uri, "model.checkpoint", None)
    assert not storage.is_uri(local)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(local).iterdir()}
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()}
    weights = _resolve_weights(f"{uri}/model.safetensors", "train.distillation.teacher", None)
    assert Path(weights).read_bytes() == (Path(folder) / "model.safetensors").read_bytes()

    missing = parse_config({"model": {"name": "vit_pico_patch4_32", "checkpoint": f"s3://{BUCKET}/models/none"}})
    with pytest.raises(ConfigError, match=f"model.checkpoint: not found: s3://{BUCKET}/models/none"):
        check_config(missing)


@pytest.mark.slow
def test_pack_train_kill_resume_register_score_kill_rerun_all_in_the_bucket(s3_env, tmp_path, monkeypatch):
    """The whole life of a model with nothing but caches on local disk: pack into the bucket -> train 2 workers
    with DeepSpeed checkpoints in the bucket -> a worker is killed -> Ray Train resumes from the bucket's checkpoint
    -> export to the bucket -> registered, MLflow artifacts in the bucket -> score the shards into the bucket -> the
    scoring job is killed -> the rerun finishes it: every id exactly once -> the last checkpoint resumed on another
    worker count."""
    import boto3

    from vitray import storage

    s3 = s3_env  # this process reads the bucket too, to check what the commands wrote
    home = tmp_path / "home"
    monkeypatch.setenv("VITRAY_HOME", str(home))  # the commands' MLflow store (sqlite) is this home's
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    root = f"s3://{BUCKET}/e2e"
    src = tmp_path / "digits"
    good = make_digits_folder(src, bad=3)
    res = _cli(["data", "pack", str(src), f"{root}/shards", "--format", "imagefolder", "--shard-rows", "64"], env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert storage.list_files(f"{root}/shards/_logs")  # the pack's log went to the bucket too

    cfg = {
        "model": {"name": "vit_pico_patch4_32", "num_classes": 10, "pos_embed": "sincos"},
        "data": {"path": f"{root}/shards", "batch_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3,
                 "train_transforms": {"scale": [0.6, 1.0], "hflip": 0.0}, "eval_transforms": {"crop_pct": 1.0}},
        "train": {"epochs": 1, "lr": 6e-3, "warmup_epochs": 0, "log_every_steps": 1, "checkpoint_every_steps": 5},
        "deepspeed": {"zero_stage": 2},
        "cluster": {"num_workers": 2, "max_failures": 1, "run_name": "s3run", "storage_path": f"{root}/runs"},
        "tracking": {"enabled": True, "registered_model": "digits-s3", "artifact_location": f"{root}/mlflow",
                     "flush_interval_s": 1.0},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    marker = tmp_path / "killed"
    res = _cli(["train", str(tmp_path / "train.yaml")],
               {**env, "VITRAY_TEST_KILL_AT_STEP": "8", "VITRAY_TEST_KILL_MARKER": str(marker)}, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert marker.read_text() == "8"  # a worker really died at step 8 ...
    resumed = [line for line in out.splitlines() if "[vitray] resumed from" in line]
    assert len(resumed) == 1 and f"resumed from {root}/runs/s3run/checkpoint_" in resumed[0] and "step 5," in resumed[0]
    run_files = [p for p, _ in storage.list_files(f"{root}/runs/s3run", recursive=True)]
    assert any("/checkpoint_" in p for p in run_files)
    assert f"{root}/runs/s3run/export/vitray_model.json" in run_files
    assert f"{root}/runs/s3run/config.yaml" in run_files and any("/logs/train-" in p for p in run_files)

    from vitray.tracking import default_tracking_uri
    from vitray.tracking.uris import client_for

    client = client_for(default_tracking_uri())
    version = client.get_model_version_by_alias("digits-s3", "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith(f"{root}/mlflow")
    history = client.get_metric_history(run.info.run_id, "train/loss")
    steps, logged = {m.step for m in history}, len(history)
    assert steps == set(range(1, max(steps) + 1)) and max(steps) >= 12  # no gap, through the end of the epoch
    mlflow_files = [p for p, _ in storage.list_files(f"{root}/mlflow", recursive=True)]
    assert any(p.endswith("/MLmodel") for p in mlflow_files) and any(p.endswith(".png") for p in mlflow_files)

    # score every packed image into the bucket; kill the job once its first units are there; rerun
    output = f"{root}/scores"
    cmd = ["score", "--model", "models:/digits-s3@champion", "--input", f"{root}/shards", "--output", output,
           "--batch-size", "8"]
    units = len(json.loads(storage.read_text(f"{root}/shards/manifest.json"))["shards"])
    done_before = run_and_kill_midway([sys.executable, "-m", "vitray.cli", *cmd], env, tmp_path / "score-1.log",
                                      lambda: [p for p, _ in storage.list_files(output) if "/part-" in p], units)
    assert 1 <= len(done_before) < units
    res = _cli(cmd, env)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    summary = json.loads(storage.read_text(f"{output}/_summary.json"))
    assert summary["units"] == units and summary["units_skipped"] == len(done_before)
    ids = [i for p, _ in storage.list_files(output) if "/part-" in p
           for i in pq.read_table(p, columns=["id"])["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == len(good) and set(ids) == set(good)  # every id once: no duplicate, no gap
    assert not [p for p, _ in storage.list_files(output, recursive=True) if "/_tmp/" in p]
    assert any("/_logs/score-" in p for p, _ in storage.list_files(output, recursive=True))

    # the finished run resumed from its last checkpoint in the bucket on another worker count: a second epoch on 1
    n = max(steps)
    res = _cli(["train", str(tmp_path / "train.yaml"), "--resume", "s3run", "--set", "cluster.num_workers=1",
                "--set", "train.epochs=2"], env, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "checkpoint of 2 workers -> 1: converted to a DeepSpeed universal checkpoint" in out
    (line,) = [x for x in out.splitlines() if "[vitray] resumed from" in x]
    assert f"resumed from {root}/runs/s3run/checkpoint_" in line and f"step {n}," in line
    history = client.get_metric_history(run.info.run_id, "train/loss")  # the same MLflow run went on
    later = sorted(m.step for m in history if m.step > n)
    assert len(later) >= 3 and later == list(range(n + 1, n + 1 + len(later))), later
    assert len([m for m in history if m.step <= n]) == logged  # nothing before step n was redone

    # nothing but caches on local disk: no shards, checkpoints, export, artifacts or predictions under the home
    local = [p for p in home.rglob("*") if p.is_file()]
    assert not [p for p in local if p.suffix == ".parquet" or "checkpoint" in p.name or p.name == "vitray_model.json"
                or "artifacts" in p.parts], local
    s3c = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3c.list_objects_v2(Bucket=BUCKET, Prefix="e2e/scores/")["Contents"]]
    assert len([k for k in keys if "/part-" in k]) == units
