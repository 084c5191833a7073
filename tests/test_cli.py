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
    res = cli("models", "zoo")
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith(("vit_", "deit"))}
    assert "vit_tiny_patch4_32" in rows and "vit_base_patch16_224" in rows and "deit_small_distilled_patch16_224" in rows
    base = rows["vit_base_patch16_224"]
    assert base[5] == "86.57" and base[6] == "35.13"  # params (M) and forward GFLOPs at 224


@pytest.mark.slow
def test_quickstart_runs_on_embedded_defaults(cli, tmp_path):
    res = cli("quickstart", "--home", str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "quickstart done" in res.stdout
    assert (tmp_path / "quickstart" / "config.yaml").is_file()
