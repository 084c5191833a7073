"""The Ray job entrypoints delegate to the CLI (same config handling, same exit codes)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_job_entrypoint_rejects_bad_config_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), str(bad)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "train.epochz" in res.stderr and "Traceback" not in res.stderr


def test_train_with_registry_uri_fails_fast_with_exit_2(tmp_path):
    """A registry URI that does not resolve stops the run before any cluster work, naming the field."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  checkpoint: models:/x@champion\ndata:\n  path: {tmp_path}\n")
    (tmp_path / "manifest.json").write_text("{}")
    res = subprocess.run([sys.executable, "-m", "vitray.cli", "train", str(cfg)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "model.checkpoint" in res.stderr, res.stderr
