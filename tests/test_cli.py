"""The command line: help, the model zoo listing, the quickstart on the embedded defaults."""
from __future__ import annotations

import pytest


def test_help_lists_commands(cli):
    res = cli("--help")
    assert res.returncode == 0
    for word in ("quickstart", "models", "config"):
        assert word in res.stdout


def test_no_command_is_usage_error(cli):
    assert cli().returncode == 2


def test_models_zoo_lists_names_with_params_and_gflops(cli):
    res = cli("models", "zoo", "--filter", "vit_tiny_patch4,base_patch16_224,deit_small_distilled")
    assert res.returncode == 0, res.stderr
    assert "vit_small_patch4_32" not in res.stdout  # filtered
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith(("vit_", "deit"))}
    assert "vit_tiny_patch4_32" in rows and "vit_base_patch16_224" in rows and "deit_small_distilled_patch16_224" in rows
    base = rows["vit_base_patch16_224"]
    assert base[5] == "86.57" and base[6] == "35.13"  # params (M) and forward GFLOPs at 224


@pytest.mark.slow
def test_quickstart_runs_on_embedded_defaults(tmp_path):
    """The whole product on the embedded defaults, in a terminal (a pty) as a person runs it: at most about 60
    lines from start to end, each once, ending with the summary and the `vitray ui` line. Also the accuracy check
    of the training recipe: the digits ViT (2 workers, ZeRO-2, 25 epochs) reaches >= 90% val top-1, and the
    export, evaluated offline, is that model."""
    from console_tools import run_in_pty, screen_lines

    rc, raw = run_in_pty(["quickstart", "--home", str(tmp_path)], timeout=900)
    lines = screen_lines(raw)
    stdout = "\n".join(lines)
    assert rc == 0, stdout[-3000:]
    assert len(lines) <= 60, stdout
    said = [line for line in lines if line.strip()]
    assert len(said) == len(set(said)), [line for line in said if said.count(line) > 1]
    assert "quickstart done" in stdout and "Traceback" not in stdout and "TrainingReport(" not in stdout
    assert b"\x1b[2K" in raw and "train  [" in raw.decode(errors="replace")  # the live progress display was drawn
    assert lines[-1].startswith(f"see the run's curves and confusion matrix: vitray ui --home {tmp_path}, then open "
                                "http://127.0.0.1:5000/#/experiments/"), lines[-1]
    assert any(line.split()[:1] == ["log"] for line in lines[-12:]), "the summary names the log file"
    assert (tmp_path / "quickstart" / "config.yaml").is_file()
    # the embedded MLflow store under --home: a finished run with the DESIGN metrics, the model registered champion,
    # and the registered pyfunc agreeing with the export (the quickstart prints the largest probability gap)
    from vitray.tracking.uris import client_for

    client = client_for(f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("vitray-quickstart")
    runs = client.search_runs([exp.experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("vitray.source") != "vitray score"]
    (scoring,) = [r for r in runs if r.data.tags.get("vitray.source") == "vitray score"]
    assert scoring.data.metrics["score/rows"] == 1797 and scoring.data.tags["vitray.model_version"] == "1"
    assert run.info.status == "FINISHED" and run.data.metrics["val/top1"] >= 0.9
    assert {"train/loss", "train/lr", "train/images_per_s", "val/loss", "val/top5", "epoch", "step"} <= set(run.data.metrics)
    assert str(client.get_model_version_by_alias("digits-vit", "champion").version) == "1"
    gap = float(stdout.split("max |p - p_export| ")[1].split()[0])
    assert gap <= 1e-5
    assert run.data.metrics["step"] == 300  # 25 epochs x 12 optimizer steps
    # the scoring stage: every packed image scored once into Parquet
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "quickstart" / "predictions").num_rows == 1797
    # the serving stage: the champion behind Ray Serve answered one real HTTP request
    assert "POST http://127.0.0.1:" in stdout and "from digits-vit v1 @champion" in stdout
    offline = float(stdout.split("195 val images, top-1 ")[1].split()[0])  # printed with 3 decimals
    assert abs(offline - run.data.metrics["val/top1"]) <= 5e-4


def test_serve_usage_errors_exit_2_before_starting_anything(tmp_path, capsys, monkeypatch):
    """`vitray serve` checks what it can before Ray starts: no models, a model URI that does not resolve, an auth
    token source that is not there."""
    import ray

    from vitray.cli import main

    was_up = ray.is_initialized()  # the session's cluster may already run (test order): nothing may start one
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("serve:\n  models: []\n")
    monkeypatch.delenv("VITRAY_TEST_TOKEN", raising=False)
    cases = [
        ([], "give a CONFIG.yaml"),
        ([str(cfg)], "serve.models is empty"),
        (["--model", str(tmp_path / "nowhere")], "no such file or folder"),
        (["--model", str(tmp_path), "--set", "serve.auth_token_env=VITRAY_TEST_TOKEN"], "VITRAY_TEST_TOKEN"),
        (["--model", str(tmp_path), "--set", f"serve.auth_token_file={tmp_path / 'token'}"], "missing or empty"),
        (["reload", "a.yaml", "b.yaml"], "expected one CONFIG.yaml"),
    ]
    for args, words in cases:
        assert main(["serve", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (args, err)
    assert ray.is_initialized() == was_up
