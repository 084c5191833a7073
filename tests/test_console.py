"""What vitray prints: its own lines and the libraries' warnings once, one progress display per stage (live on a
terminal, plain lines elsewhere), the complete log in a file of the run's storage, and `vitray ui`."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from console_tools import run_in_pty, screen_lines

from vitray.console import KNOWN_HARMLESS, is_warning, plain

CURSOR = re.compile(r"\x1b|\r")

# what Ray, DeepSpeed and MLflow print, as they print it (taken from real runs here)
RAY_WARNING = "2026-12-01 16:37:21,581\tWARNING dataset.py:8601 -- Warning: the shuffle spilled 3 GiB to disk"
CXX_ERROR = "(TrainController pid=20087) [2026-12-01 16:37:34,154 E 20087 20148] core_worker.cc:99: lost object"
PY_WARNING = "/site-packages/mlflow/x.py:440: UserWarning: Hint: something odd"
DS_WARNING = "[2026-12-01 16:26:26,499] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU."
INFO = "(TrainController pid=15684) Requesting resources: {'CPU': 1.0} * 2"
REPORT = ("(RayTrainWorker pid=15763) Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem="
          "local, path=/tmp/x))")


def test_plain_strips_cursor_control_and_keeps_a_redrawn_line_last_state():
    assert plain("\x1b[36m(RayTrainWorker pid=1)\x1b[0m hi\n") == "(RayTrainWorker pid=1) hi"
    assert plain("\r 10%|#   |\r 50%|##  |\r100%|####|") == "100%|####|"
    assert plain("\x1b[2Ktrain  [###]  3/3") == "train  [###]  3/3"


def test_warning_lines_are_recognised_and_triaged_ones_are_not():
    for line in (RAY_WARNING, CXX_ERROR, PY_WARNING, "(RayTrainWorker pid=3) [vitray] warning: MLflow is gone",
                 "2026/12/01 16:37:17 WARNING mlflow.tracking: retrying"):
        assert is_warning(line), line
    for line in (INFO, REPORT, DS_WARNING, "[vitray] epoch 1/2 done: val/top1 0.5",
                 "2026-12-01 16:37:21,631\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set x"):
        assert not is_warning(line), line
    assert all(reason for _, reason in KNOWN_HARMLESS), "every triaged message says why it is harmless"


SCRIPT = textwrap.dedent("""
    import os, subprocess, sys, time
    from vitray import console

    with console.capture("demo") as spool:
        print("[vitray] starting", flush=True)
        print("  an indented continuation of it", flush=True)
        print("some library INFO line nobody asked for", flush=True)
        for pid in (11, 12, 13):  # one warning, three processes: shown once
            print(f"(MapWorker(MapBatches(Scorer)) pid={{pid}}) {RAY_WARNING}", flush=True)
        print({DS_WARNING!r}, file=sys.stderr, flush=True)
        print("Traceback (most recent call last):", file=sys.stderr, flush=True)
        print('  File "x.py", line 1, in <module>', file=sys.stderr, flush=True)
        print("ValueError: deep inside a retried task", file=sys.stderr, flush=True)
        subprocess.run(["sh", "-c", "echo from-a-child-process"])  # children write into the same pipes
        print({REPORT!r}, flush=True)
        bar = console.progress("score", total=4, unit="images", interval_s=0)
        for i in range(1, 5):
            bar.update(i, **{{"": f"{{i * 10}} img/s"}})
        bar.milestone("[vitray] half way", final=False)
        bar.close()
        with console.log_to(sys.argv[1]) as run_log:
            console.say("[vitray] done")
    print("after the capture", flush=True)
    print("SPOOL", spool, spool.exists())
""").replace("{RAY_WARNING}", RAY_WARNING)


def _demo(tmp_path, pty: bool = False, env: dict | None = None):
    script = tmp_path / "demo.py"
    script.write_text(SCRIPT.format(DS_WARNING=DS_WARNING, REPORT=REPORT))
    run_log = tmp_path / "run" / "logs" / "demo.log"
    if pty:
        import pty as _pty

        master, slave = _pty.openpty()
        proc = subprocess.Popen([sys.executable, str(script), str(run_log)], stdout=slave, stderr=slave,
                                env={**os.environ, **(env or {})})
        os.close(slave)
        out = bytearray()
        while True:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            out.extend(chunk)
        proc.wait(60)
        os.close(master)
        return proc.returncode, bytes(out).decode(), "", run_log
    res = subprocess.run([sys.executable, str(script), str(run_log)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    return res.returncode, res.stdout, res.stderr, run_log


def test_capture_shows_own_lines_and_each_warning_once_and_logs_everything(tmp_path):
    rc, out, err, run_log = _demo(tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[:2] == ["[vitray] starting", "  an indented continuation of it"]
    assert sum("the shuffle spilled" in line for line in lines) == 1  # three processes, one line
    assert "from-a-child-process" not in out and "nobody asked" not in out and "TrainingReport(" not in out
    assert "Traceback" not in out + err and "ValueError" not in out + err and "Setting accelerator" not in err
    # non-tty progress: plain lines (interval 0 here: every update), no cursor control anywhere
    assert "[vitray] score 4/4 images (100%) eta 0m00s 40 img/s" in lines
    assert "[vitray] half way" in lines and "[vitray] done" in lines and "after the capture" in lines
    assert not CURSOR.search(out + err)
    assert len(lines) == len(set(lines)), "a line was printed twice"
    # the spool log has every line, the library's included, once each; the run's log starts with all of it
    spool = Path(lines[-1].split()[1])
    assert lines[-1].endswith("False"), "a spool copied into the run's storage is removed at the end"
    assert spool.parent == Path(os.environ["VITRAY_HOME"]) / "logs"
    logged = run_log.read_text()
    for text in ("[vitray] starting", "nobody asked", "from-a-child-process", "TrainingReport(", "ValueError",
                 "Setting accelerator", "[vitray] done"):
        assert text in logged, text
    assert logged.count("the shuffle spilled") == 3 and not CURSOR.search(logged)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[vitray\] starting$", logged.splitlines()[0])


def test_capture_on_a_terminal_draws_one_live_line_and_verbose_shows_everything(tmp_path):
    rc, out, _, _ = _demo(tmp_path, pty=True)
    assert rc == 0
    assert "\x1b[2K" in out and "score  [#####" in out  # the live display, redrawn in place
    shown = screen_lines(out.encode())
    assert not any(line.startswith("score  [") for line in shown), "the live line is cleared when its stage ends"
    assert "[vitray] done" in shown and "nobody asked" not in out
    rc, out, err, _ = _demo(tmp_path, env={"VITRAY_VERBOSE": "1"})
    assert rc == 0 and "nobody asked" in out and "from-a-child-process" in out and "Traceback" in err


# ------------------------------------------------------------------------------------------ the real commands
def _train_config(tmp_path: Path, digits: str) -> Path:
    cfg = {"model": {"name": "vit_pico_patch4_32", "num_classes": 10, "img_size": 16},  # 16 px: a quarter the tokens
           "data": {"path": digits, "batch_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3},
           "train": {"epochs": 2, "warmup_steps": 1, "log_every_steps": 2},
           "cluster": {"num_workers": 2, "storage_path": str(tmp_path / "runs"), "run_name": "console"},
           "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "console",
                        "registered_model": "console-vit"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_cli_training_and_scoring_print_once_without_cursor_control_and_log_the_workers(digits, tmp_path):
    """Through the real CLI with stdout a pipe (CI, `ray job submit`, KubeRay): vitray's lines, each once, plain
    progress lines, no Ray Train dumps; the run's log file (and its MLflow copy) holds what the workers printed."""
    env = {"VITRAY_PROGRESS_EVERY_S": "0"}  # every progress event a line: the most a run can print
    res = run_cli("train", str(_train_config(tmp_path, digits)), env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    assert not CURSOR.search(out) and "TrainingReport(" not in out and "PlacementGroupCleaner" not in out
    assert re.search(r"^\[vitray\] train \d+/24 steps \(\d+%\) eta \S+ epoch 1/2 loss [\d.]+ lr \S+ \d+ img/s",
                     res.stdout, re.M), res.stdout
    assert "[vitray] epoch 2/2 done: val/loss" in res.stdout and "[vitray] done in" in res.stdout
    assert "[vitray] registered console-vit v1" in res.stdout
    log = Path(re.search(r"\[vitray\] log of this run: (\S+)", res.stdout).group(1))
    assert log.parent == tmp_path / "runs" / "console" / "logs"
    text = log.read_text()
    assert "(RayTrainWorker pid=" in text and "Setting up process group" in text  # the workers' own lines
    assert "[vitray] epoch 1/2 done" in text and not CURSOR.search(text)
    from vitray.tracking.uris import client_for

    client = client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("console").experiment_id])[0]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "logs")] == [f"logs/{log.name}"]

    res = run_cli("score", "--model", "models:/console-vit@champion", "--input", digits, "--output",
                  str(tmp_path / "scored"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)) and not CURSOR.search(out), out
    assert re.search(r"^\[vitray\] score [\d,]+/1,797 images", res.stdout, re.M), res.stdout
    assert "[vitray] scored 1,797 images" in res.stdout
    (log,) = (tmp_path / "scored" / "_logs").glob("score-*.log")
    assert "MapWorker(MapBatches(Scorer))" in log.read_text() or "Scorer" in log.read_text()


def test_vitray_ui_serves_the_run_page_of_the_embedded_store(tmp_path):
    """`vitray ui` on the embedded default store (here under VITRAY_HOME): a real `mlflow server` on 127.0.0.1
    answers for the latest run; Ctrl-C stops it and the workers it started."""
    from vitray.tracking import default_tracking_uri
    from vitray.tracking.runs import ensure_experiment
    from vitray.tracking.uris import client_for

    uri = default_tracking_uri(None)
    assert uri.startswith("sqlite:///") and os.environ["VITRAY_HOME"] in uri
    client = client_for(uri)
    exp = ensure_experiment(client, "ui-test", uri)
    run = client.create_run(exp, run_name="the-latest")
    client.log_metric(run.info.run_id, "val/top1", 0.93, step=3)
    proc = subprocess.Popen([sys.executable, "-m", "vitray.cli", "ui", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "Ctrl-C" in line or not line:
                break
        url = re.search(r"(http://127\.0\.0\.1:\d+)/#/experiments/(\d+)/runs/(\w+)", "".join(seen))
        assert url, "".join(seen)
        base, exp_id, run_id = url.groups()
        assert (exp_id, run_id) == (exp, run.info.run_id) and "the-latest" in "".join(seen)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as resp:
            body = json.loads(resp.read())
        assert resp.status == 200 and body["run"]["info"]["run_id"] == run_id
        assert body["run"]["data"]["metrics"][0]["value"] == 0.93
        with urllib.request.urlopen(base + "/", timeout=30) as resp:
            assert resp.status == 200 and b"<html" in resp.read().lower()  # the UI itself
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    assert rc == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(base + "/health", timeout=5)


def test_a_deprecated_ray_call_in_vitray_code_fails_the_suite(ray_cluster):
    """pyproject's filterwarnings turns a deprecation warning raised by a call from a vitray module into an error,
    so any test that reaches such a call fails (scoring once passed `max_retries` through `**ray_remote_args`)."""
    import ray.data

    ds = ray.data.range(4)
    code = compile("ds.map_batches(lambda b: b, max_retries=1)", "vitray/probe.py", "exec")
    with pytest.raises(DeprecationWarning, match="ray_remote_args"):
        exec(code, {"__name__": "vitray.probe", "ds": ds})
    exec(code.replace(co_filename="elsewhere.py"), {"__name__": "not_vitray", "ds": ds})  # only vitray's calls


def test_verbose_flag_before_or_after_the_command():
    from vitray.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["--verbose", "train", "c.yaml"]).verbose is True
    assert parser.parse_args(["train", "c.yaml", "-v"]).verbose is True
    assert parser.parse_args(["train", "c.yaml"]).verbose is False
    assert parser.parse_args(["score", "--model", "m"]).capture == "score"
    assert not hasattr(parser.parse_args(["models", "zoo"]), "capture")


def test_a_live_line_too_wide_for_the_terminal_leaves_out_whole_fields():
    from vitray.console import Progress

    bar = Progress("train", total=300, unit="steps", interval_s=3600)
    bar.update(96, eta_s=100, **{"epoch": "8/25", "loss": "1.5181", "": "353 img/s", "val/top1": "0.6256"})
    full = bar.render()
    assert full.endswith("353 img/s  val/top1 0.6256")
    assert bar.render(width=len(full) - 1).endswith("loss 1.5181  353 img/s")
    assert bar.render(width=30) == full[:30]  # narrower than the fixed part: cut
