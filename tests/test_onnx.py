"""ONNX export (`vitray export --format onnx [--int8]`) and the onnx runtime: every zoo model exports with a dynamic
batch axis and matches PyTorch; a ViT trained on scikit-learn's bundled digits keeps its answers in fp32 (1e-4) and
int8 (top-1 agreement, val top-1); a registered version gets its ONNX export attached and is served (real Ray Serve
over HTTP) and scored (real Ray Data) through ONNX Runtime with the torch runtime's answers; the serving path imports
and answers with torch, timm and DeepSpeed blocked."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import requests

from digits_classifier import digit_rows, train_digits_classifier
from imagegen import encode, rgb

PRE = {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875, "interpolation": "bicubic"}
CHECK_IMAGES = [encode(rgb(i, size=(40 + 3 * i, 30 + 2 * i)), "PNG" if i % 2 else "JPEG") for i in range(6)]


def _random_export(folder, name: str, num_classes: int = 10, seed: int = 0):
    import torch

    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.models.zoo import default_img_size

    torch.manual_seed(seed)
    model = create_model(name, num_classes=num_classes)
    size = default_img_size(name)
    arch = {"name": name, "num_classes": num_classes, "img_size": size}
    return save_export(folder, model.state_dict(), model=arch, task="classification",
                       class_names=[str(i) for i in range(num_classes)], preprocessing={**PRE, "img_size": size})


def _zoo() -> list[str]:
    from vitray.models import VITRAY_MODELS

    return sorted(VITRAY_MODELS)


@pytest.mark.parametrize("name", _zoo())
def test_every_zoo_model_exports_with_a_dynamic_batch_and_matches_pytorch(name, tmp_path):
    from vitray.onnx_export import export_onnx
    from vitray.predict import Predictor

    src = _random_export(tmp_path / "torch", name)
    result = export_onnx(str(src), tmp_path / "onnx", check_images=CHECK_IMAGES)
    assert result.exporter == "dynamo", result.exporter  # the exporter the module docstring promises for timm ViTs
    assert result.parity_max_abs_diff <= 1e-4
    meta = json.loads((tmp_path / "onnx" / "vitray_model.json").read_text())
    assert meta["onnx"]["files"] == {"fp32": "model.onnx"} and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["preprocessing"]["img_size"] == meta["model"]["img_size"]
    torch_p = Predictor.from_export(src, precision="fp32")
    onnx_p = Predictor.from_export(tmp_path / "onnx", runtime="onnx")
    for n in (1, 5):  # batch sizes other than the traced one
        assert np.abs(onnx_p.probabilities(CHECK_IMAGES[:n]) - torch_p.probabilities(CHECK_IMAGES[:n])).max() <= 1e-4


def _task_export(folder, task: str):
    """A random-weight export of ``task``'s model, written as training writes it (the task's arch and state)."""
    import torch

    from vitray.config import parse_config
    from vitray.models.export import save_export
    from vitray.tasks import get_task

    torch.manual_seed(0)
    name, size = ("vit_pico_patch8_64", 64) if task == "detection" else ("vit_pico_patch4_32", 32)
    cfg = parse_config({"model": {"name": name, "num_classes": 3, "img_size": size}, "train": {"task": task}})
    arch = get_task(task).load("model")
    state = arch.for_training(cfg).state_dict()
    if hasattr(arch, "export_state"):
        state = arch.export_state(state)
    return save_export(folder, state, model=arch.arch(cfg, size), task=task, preprocessing={**PRE, "img_size": size},
                       class_names=list("abc") if get_task(task).labelled else [])


def _same_answers(a, b, tol: float) -> None:
    """Two runtimes' answers to the same images agree (arrays within ``tol``; dicts key by key)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same_answers(a[k], b[k], tol)
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and (np.abs(a.astype(np.float64) - b).max() if a.size else 0) <= tol


@pytest.mark.parametrize("task", ["classification", "segmentation", "detection", "mae"])
def test_every_task_exports_and_answers_through_onnx_as_through_torch(task, tmp_path):
    """Post-processing stays outside the graph, so the task head gives the same answers on both runtimes: class
    probabilities, masks at each image's size, boxes in its pixels, embeddings."""
    from vitray.onnx_export import export_onnx
    from vitray.predict import Predictor

    src = _task_export(tmp_path / "torch", task)
    result = export_onnx(str(src), tmp_path / "onnx", check_images=CHECK_IMAGES)
    assert result.exporter == "dynamo" and result.parity_max_abs_diff <= 1e-4, (result.exporter, result.line())
    want = Predictor.from_export(src, precision="fp32").predict(CHECK_IMAGES)
    got = Predictor.from_export(tmp_path / "onnx", runtime="onnx").predict(CHECK_IMAGES)
    assert len(got) == len(want) == len(CHECK_IMAGES)
    for a, b in zip(got, want):
        if task == "segmentation":  # class-index masks: a pixel on a near-tie may flip
            assert a.shape == b.shape and (a == b).mean() >= 0.999
        else:
            _same_answers(a, b, 1e-4)


# --------------------------------------------------------------------------------- a classifier trained on digits
@pytest.fixture(scope="module")
def digits_onnx(digits, tmp_path_factory):
    from vitray.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("onnx-digits")
    src = train_digits_classifier(digits, root / "torch")
    val = [im for im, _ in digit_rows(digits, "val")]
    export_onnx(str(src), root / "onnx", int8=True, check_images=val[:32])
    return src, root / "onnx", digits


@pytest.mark.slow
def test_fp32_and_int8_keep_a_digits_classifiers_answers(digits_onnx):
    from vitray.models.export import load_export
    from vitray.onnx_runtime import OnnxModel
    from vitray.predict import Predictor, export_metrics

    src, onnx, shards = digits_onnx
    model, meta = load_export(src)
    top1 = {"torch": export_metrics(model, meta, shards)[0]["val/top1"]}
    for precision in ("fp32", "int8"):
        top1[precision] = export_metrics(OnnxModel(onnx, precision), meta, shards)[0]["val/top1"]
    assert top1["torch"] >= 0.8, top1  # a real classifier, or agreement means little
    assert top1["fp32"] == top1["torch"] and abs(top1["int8"] - top1["torch"]) <= 0.01, top1

    images = [im for split in ("train", "val") for im, _ in digit_rows(shards, split)]  # every digit the package ships
    want = Predictor.from_export(src, precision="fp32").probabilities(images)
    fp32 = Predictor.from_export(onnx, runtime="onnx").probabilities(images)
    int8 = Predictor.from_export(onnx, runtime="onnx", precision="int8").probabilities(images)
    assert np.abs(fp32 - want).max() <= 1e-4
    agreement = float((int8.argmax(1) == want.argmax(1)).mean())
    assert agreement >= 0.99, agreement
    record = json.loads((onnx / "vitray_model.json").read_text())["onnx"]
    assert record["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert record["parity_max_abs_diff"] <= 1e-4 and record["check_batch"] == "32 images"
    assert (onnx / "model.int8.onnx").stat().st_size <= 0.35 * (onnx / "model.onnx").stat().st_size


# ------------------------------------------------------------------------ registry, serving and scoring on ONNX
@pytest.mark.slow
def test_a_registered_version_gets_its_onnx_export_and_is_served_and_scored_through_it(
        digits_onnx, ray_cluster, cli, tmp_path):
    import pyarrow.parquet as pq
    from ray import serve

    from vitray.batch import score
    from vitray.config import TrackingConfig, parse_config
    from vitray.predict import Predictor
    from vitray.serve import app
    from vitray.tracking.registry import log_and_register
    from vitray.tracking.uris import ONNX_TAG, client_for

    src, _, shards = digits_onnx
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reg = log_and_register(str(src), TrackingConfig(uri=uri, registered_model="digits"))
    assert reg.alias == "champion"

    # before the export: the onnx runtime names the command that makes one, before anything starts
    r = cli("serve", "--model", "models:/digits@champion", "--runtime", "onnx", "--tracking-uri", uri)
    assert r.returncode == 2 and "vitray export models:/digits/1 --format onnx" in r.stderr, r.stderr
    r = cli("serve", "--model", "models:/digits@champion", "--precision", "int8", "--tracking-uri", uri)
    assert r.returncode == 2 and "precision int8 needs runtime onnx" in r.stderr, r.stderr

    r = cli("export", "models:/digits@champion", "--format", "onnx", "--int8", "-o", str(tmp_path / "onnx"),
            "--tracking-uri", uri)
    assert r.returncode == 0, r.stderr
    assert "attached to models:/digits/1" in r.stdout and "dynamo exporter" in r.stdout, r.stdout
    tag = client_for(uri).get_model_version("digits", "1").tags[ONNX_TAG]
    assert tag.startswith("runs:/") and tag.endswith("/onnx/v1")

    images = [im for im, _ in digit_rows(shards, "val")][:24]
    want = Predictor.from_export(src, precision="fp32").probabilities(images)

    port = _free_port()
    cfg = parse_config({"tracking": {"uri": uri}, "serve": {
        "port": port, "runtime": "onnx", "models": [{"name": "digits", "uri": "models:/digits@champion"}],
        "max_batch_size": 8, "cpus_per_replica": 1}})
    app.deploy(cfg)
    try:
        url = f"http://127.0.0.1:{port}"
        info = requests.get(f"{url}/v1/models", timeout=30).json()["models"][0]
        assert info["runtime"] == "onnx" and info["precision"] == "fp32" and info["version"] == "1", info
        for image, p in zip(images, want):
            body = requests.post(f"{url}/v1/classify", data=image, params={"probs": "true"}, timeout=60,
                                 headers={"content-type": "image/png"}).json()
            assert np.abs(np.array(body["probs"]) - p).max() <= 1e-4, body
        bad = requests.post(f"{url}/v1/classify", data=b"nope", timeout=60, headers={"content-type": "image/png"})
        assert bad.status_code == 400 and "error" in bad.json()
    finally:
        serve.shutdown()

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        (folder / f"{i:03d}.png").write_bytes(image)
    (folder / "broken.png").write_bytes(b"not a png")
    for precision in ("auto", "int8"):
        out = tmp_path / f"scored-{precision}"
        summary = score("models:/digits@champion", str(folder), str(out), runtime="onnx", precision=precision,
                        tracking_cfg=TrackingConfig(uri=uri), batch_size=8)
        assert summary.runtime == "onnx" and summary.precision == ("fp32" if precision == "auto" else "int8")
        t = pq.read_table(out).sort_by("id").to_pylist()
        rows = {r["id"]: r for r in t}
        assert rows["broken.png"]["error"] and rows["broken.png"]["label"] is None
        got = np.array([rows[f"{i:03d}.png"]["score"] for i in range(len(images))])
        labels = np.array([rows[f"{i:03d}.png"]["label"] for i in range(len(images))])
        if precision == "auto":
            assert np.abs(got - want.max(1)).max() <= 1e-4 and (labels == want.argmax(1)).all()
        else:
            assert (labels == want.argmax(1)).mean() >= 0.95
    with pytest.raises(Exception, match="started on the onnx runtime"):
        score("models:/digits@champion", str(folder), str(tmp_path / "scored-auto"),
              tracking_cfg=TrackingConfig(uri=uri))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------- no torch at run time
def test_the_onnx_serving_path_imports_and_answers_with_torch_blocked(tmp_path):
    """A serving image built for ONNX has no torch, timm or DeepSpeed: the serving modules, the predictor, the
    classification head and the ONNX runtime import and answer in a process where importing them fails."""
    from vitray.onnx_export import export_onnx
    from vitray.predict import Predictor

    src = _random_export(tmp_path / "torch", "vit_pico_patch4_32")
    export_onnx(str(src), tmp_path / "onnx", int8=True)
    (tmp_path / "images.json").write_text(json.dumps([im.hex() for im in CHECK_IMAGES]))
    want = Predictor.from_export(src, precision="fp32").probabilities(CHECK_IMAGES)
    code = textwrap.dedent(f"""
        import json, sys
        for blocked in ("torch", "torchvision", "timm", "deepspeed"):
            sys.modules[blocked] = None  # `import torch` raises ImportError from here on
        import vitray.serve.app, vitray.serve.ingress, vitray.serve.model  # what a Serve replica imports
        from vitray.predict import Predictor
        from vitray.tracking.uris import resolve_model_uri
        p = Predictor.from_export(resolve_model_uri({str(tmp_path / 'onnx')!r}, runtime="onnx"), runtime="onnx")
        images = [bytes.fromhex(h) for h in json.load(open({str(tmp_path / 'images.json')!r}))]
        probs = p.probabilities(images).tolist()
        q = Predictor.from_export({str(tmp_path / 'onnx')!r}, runtime="onnx", precision="int8")
        answer = q.head.respond(q.predict(images[:1])[0], None, q.head.Params(), q.meta)
        loaded = "torch" in sys.modules and sys.modules["torch"] is not None
        print(json.dumps({{"probs": probs, "answer": answer, "torch": loaded}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch"] is False
    assert np.abs(np.array(out["probs"]) - want).max() <= 1e-4
    assert out["answer"]["predictions"][0]["label"] in range(10)


def test_runtime_and_precision_mismatches_fail_at_config_load_naming_the_field():
    from vitray.config import ConfigError, parse_config

    for section, bad, words in [
        ("serve", {"precision": "int8"}, "precision int8 needs runtime onnx"),
        ("serve", {"runtime": "onnx", "precision": "bf16"}, "precision bf16 needs runtime torch"),
        ("serve", {"runtime": "onnx", "gpus_per_replica": 1}, "gpus_per_replica"),
        ("score", {"runtime": "onnx", "use_gpu": True}, "use_gpu"),
        ("score", {"runtime": "tensorrt"}, "score.runtime"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_config({section: bad})
    assert parse_config({"serve": {"runtime": "onnx", "precision": "int8"}}).serve.precision == "int8"


def test_export_and_onnx_runtime_errors_name_what_is_wrong(tmp_path, cli):
    src = _random_export(tmp_path / "torch", "vit_pico_patch4_28")
    r = cli("export", str(tmp_path / "missing"), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "no such file or folder" in r.stderr, r.stderr
    r = cli("export", str(src), "-o", str(tmp_path / "o"))
    assert r.returncode == 0 and "model.onnx" in r.stdout, r.stderr
    r = cli("export", str(src), "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "--overwrite" in r.stderr, r.stderr

    from vitray.export_format import ExportError
    from vitray.predict import Predictor

    with pytest.raises(ExportError, match="no int8 ONNX graph"):
        Predictor.from_export(tmp_path / "o", runtime="onnx", precision="int8")
    with pytest.raises(ExportError, match="an ONNX export .* onnx runtime"):
        Predictor.from_export(tmp_path / "o")
    with pytest.raises(ExportError, match="vitray export .* --format onnx"):
        Predictor.from_export(src, runtime="onnx")
