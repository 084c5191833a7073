"""The run config: YAML + --set overrides, strict validation with dotted field paths, exit 2 without traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vitray.config import ConfigError, RunConfig, check_config, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# (yaml text, --set overrides, what the one-line message must name)
BAD_CONFIGS = {
    "unknown_key": ("model:\n  name: vit_pico_patch4_32\n  nmu_classes: 10\n", [], "model.nmu_classes"),
    "unknown_section": ("modle:\n  name: x\n", [], "modle"),
    "wrong_type": ("train:\n  epochs: ten\n", [], "train.epochs"),
    "negative_batch_size": ("data:\n  batch_size: -8\n", [], "data.batch_size"),
    "bad_enum": ("deepspeed:\n  zero_stage: 4\n", [], "deepspeed.zero_stage"),
    "out_of_range": ("model:\n  drop_path: 1.5\n", [], "model.drop_path"),
    "unknown_model": ("model:\n  name: vit_gigantic_patch3_99\n", [], "model.name"),
    "missing_checkpoint": ("model:\n  checkpoint: /nonexistent/weights.safetensors\n", [], "model.checkpoint"),
    "malformed_yaml": ("model:\n  name: [unclosed\n  x: 1\n", [], "malformed YAML"),
    "bad_override": ("{}\n", ["train.lr=-1"], "train.lr"),
    "override_unknown_key": ("{}\n", ["train.epochz=3"], "train.epochz"),
    "serve_batch_cap": ("serve:\n  max_batch_size: 32\n  max_ongoing_requests: 5\n", [], "max_ongoing_requests"),
    "serve_task_unknown": ("serve:\n  models: [{name: d, uri: models:/d@champion, task: captioning}]\n", [],
                                "serve.models.0"),
    "serve_duplicate_names": ("serve:\n  models: [{name: d, uri: /a}, {name: d, uri: /b}]\n", [], "unique"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_exits_2_with_field(case, tmp_path, cli):
    text, overrides, must_name = BAD_CONFIGS[case]
    path = write(tmp_path, text)
    args = ["config", str(path)]
    for o in overrides:
        args += ["--set", o]
    res = cli(*args)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr
    assert len(err.splitlines()) == 1, err
    assert must_name in err, err


def test_missing_config_file_exits_2(tmp_path, cli):
    res = cli("config", str(tmp_path / "nope.yaml"))
    assert res.returncode == 2 and "nope.yaml" in res.stderr and "not found" in res.stderr


def test_message_says_given_and_expected(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "data:\n  batch_size: -8\n"))
    msg = str(e.value)
    assert "data.batch_size" in msg and "-8" in msg and "greater than 0" in msg


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 2\n"),
                      ["train.epochs=5", "deepspeed.precision=bf16", "data.train_transforms.scale=[0.5, 1.0]",
                       "model.img_size=null", "train.ema.enabled=true"])
    assert cfg.train.epochs == 5 and cfg.deepspeed.precision == "bf16"
    assert cfg.data.train_transforms.scale == (0.5, 1.0) and cfg.train.ema.enabled is True


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  name: vit_tiny_patch4_32\ntrain:\n  lr: 0.01\n"))
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    data = yaml.safe_load(out.read_text())
    assert data["model"]["name"] == "vit_tiny_patch4_32" and data["deepspeed"]["zero_stage"] == 0
    assert load_config(out) == cfg


def test_cli_config_prints_resolved(tmp_path, cli):
    res = cli("config", str(write(tmp_path, "train:\n  epochs: 3\n")), "--set", "cluster.num_workers=4")
    assert res.returncode == 0, res.stderr
    data = yaml.safe_load(res.stdout)
    assert data["train"]["epochs"] == 3 and data["cluster"]["num_workers"] == 4


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    cfg = load_config(path)
    check_config(cfg, files=False)


def test_quickstart_config_is_valid():
    from vitray.quickstart import quickstart_config_path

    check_config(load_config(quickstart_config_path()))
