"""The task interface: one registry, every layer found through it, and every task that can be trained and served
taken through all of its layers (data codec -> training module on the real DeepSpeed engine -> export -> reload ->
MLflow pyfunc -> HTTP through Ray Serve), with the answers compared layer against layer."""
from __future__ import annotations

import base64
import io
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagegen import encode, make_imagefolder, rgb

ROOT = Path(__file__).resolve().parents[1]
TASKED = ["classification", "segmentation", "detection", "mae"]  # the tasks with every layer; checked against the registry


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ registry
def test_the_task_list_lives_in_one_place():
    """No module outside vitray/tasks lists task names (a tuple, list, dict or Literal with two of them)."""
    from vitray.tasks import TASKS, task_names

    # generation has every layer too; its head takes prompts, so the image-task tests below leave it out
    assert task_names("infer") == TASKED + ["generation"] and task_names("train") == TASKED + ["generation"]
    names = "|".join(TASKS)
    pattern = re.compile(rf'["\']({names})["\']\s*[,:)\]].*["\']({names})["\']')
    offenders = []
    for f in (ROOT / "platform" / "vitray").rglob("*.py"):
        if "tasks" in f.relative_to(ROOT / "platform" / "vitray").parts[:1]:
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line) or re.search(rf'==\s*["\']({names})["\']', line):
                offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "task names outside the registry:\n" + "\n".join(offenders)


def test_a_task_without_a_layer_says_what_it_can_do(monkeypatch):
    from vitray.config import ConfigError, parse_config
    from vitray.tasks import TASKS, TaskError, TaskInfo, get_task

    # a task registered with its data layer only (as detection was before it could be trained)
    monkeypatch.setitem(TASKS, "keypoints", TaskInfo("keypoints", "points", "val/ap", "max", "AP", ("points",),
                                                     layers={"data": "vitray.tasks.detection.data:CODEC"}))
    with pytest.raises(TaskError, match="cannot be trained yet .*packed and streamed"):
        get_task("keypoints", "train")
    with pytest.raises(ConfigError, match=r"train\.task: .*cannot be trained yet"):
        parse_config({"train": {"task": "keypoints"}})
    with pytest.raises(ConfigError, match=r"train\.task: unknown task 'inpainting' \(known: classification"):
        parse_config({"train": {"task": "inpainting"}})
    gen = parse_config({"train": {"task": "generation"}})  # a sampling task: EMA on unless train.ema is given
    assert gen.train.ema.enabled and gen.train.ema.decay == 0.999 and gen.train.ema.warmup
    assert not parse_config({"train": {"task": "generation", "ema": {"enabled": False}}}).train.ema.enabled
    cfg = parse_config({"train": {"task": "segmentation"}})  # "auto" metrics follow the task
    assert (cfg.cluster.checkpoint_score_metric, cfg.tracking.promotion_metric) == ("val/miou", "val/miou")
    assert parse_config({}).tracking.promotion_metric == "val/top1"


def test_mismatched_task_is_refused_before_ray_starts(tmp_path, digits, cli):
    """Config vs manifest: exit 2 and one line, in seconds (no Ray, no MLflow run, no worker retries)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: {digits}}}\ntrain: {{task: segmentation, steps: 1}}\n"
                   f"tracking: {{uri: sqlite:///{tmp_path}/m.db}}\n")
    res = cli("train", str(cfg), timeout=120)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "holds classification data" in res.stderr, res.stderr
    assert not (tmp_path / "m.db").exists()  # refused before any MLflow run was opened
    cfg.write_text(f"data: {{path: {digits}}}\ntrain: {{task: detection, steps: 1}}\n")
    res = cli("train", str(cfg), timeout=120)
    assert res.returncode == 2 and "holds classification data" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_miou_matches_an_independent_implementation():
    """One confusion matrix -> per-class IoU and mIoU, as torchmetrics computes them (classes absent from both truth
    and prediction left out, ignore pixels skipped), and pixel accuracy."""
    from torchmetrics.classification import MulticlassJaccardIndex

    from vitray.tasks.segmentation.train import iou_from_confusion

    g = torch.Generator().manual_seed(0)
    c = 6
    target = torch.randint(0, c - 1, (4, 32, 32), generator=g)  # class 5 never in the truth ...
    pred = torch.where(torch.rand(4, 32, 32, generator=g) < 0.7, target, torch.randint(0, c - 1, (4, 32, 32), generator=g))
    pred[pred == 4] = 3  # ... and class 4 never predicted; class 5 in neither: no IoU, not in the mean
    target[:, :3] = 255
    valid = target != 255
    confusion = torch.bincount(target[valid] * c + pred[valid], minlength=c * c).view(c, c)
    iou, present, acc = iou_from_confusion(confusion)
    ref = MulticlassJaccardIndex(num_classes=c, average=None, ignore_index=255, zero_division=float("nan"))(pred, target)
    assert present.tolist() == [True] * 5 + [False]
    assert torch.allclose(iou[present].float(), ref[:5].float(), atol=1e-6)
    assert float(iou[present].mean()) == pytest.approx(float(ref[:5].mean()), abs=1e-6)
    assert acc == pytest.approx(float((pred[valid] == target[valid]).double().mean()), abs=1e-9)


def test_masks_map_back_to_the_original_geometry():
    """A model that calls the left half of its input class 1 and the right half class 2: the answer for an image of
    any size splits that image at its own middle (the whole image was resized, nothing cropped)."""
    from vitray.predict import Predictor

    class Halves(torch.nn.Module):
        def forward(self, x):
            n, _, h, w = x.shape
            logits = torch.zeros(n, 3, h, w)
            logits[:, 1, :, : w // 2] = 1
            logits[:, 2, :, w // 2:] = 1
            return logits

    meta = {"task": "segmentation", "class_names": ["bg", "left", "right"],
            "preprocessing": {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875,
                              "interpolation": "bicubic"}}
    p = Predictor(Halves(), meta)
    for w, h in ((97, 53), (20, 140), (32, 32)):
        (mask,) = p.predict([encode(rgb(1, (w, h)))])
        assert mask.shape == (h, w)
        cols = (mask == 2).mean(axis=0)
        assert (cols[: w // 2 - 1] == 0).all() and (cols[w // 2 + 1:] == 1).all(), (w, h)
        frame = p.frame([encode(rgb(1, (w, h)))])
        png = np.asarray(Image.open(io.BytesIO(frame["mask"][0])))
        assert png.shape == (h, w) and (png == mask).all()


# ------------------------------------------------------------------------------------- every task, every layer
def _data(task: str, root: Path) -> tuple[str, int]:
    """A small packed dataset of the task, as a user makes it; returns (shards, classes)."""
    from vitray.data.compose import compose
    from vitray.data.pack import pack

    if task == "classification":
        make_imagefolder(root / "src", classes=("ant", "bee", "cow"), per_class=6)
        m = pack(str(root / "src"), str(root / "shards"), "imagefolder", val_fraction=0.3, progress=False)
    elif task == "segmentation":
        compose("-", str(root / "src"), source="sklearn-digits", classes="0,1", n=24, size=32)
        m = pack(str(root / "src"), str(root / "shards"), "masks", val_fraction=0.3, progress=False)
    elif task == "detection":
        compose("-", str(root / "src"), source="sklearn-digits", classes="0,1", n=24, size=32)
        m = pack(str(root / "src" / "annotations.json"), str(root / "shards"), "coco", task="detection",
                 images=str(root / "src" / "images"), progress=False)
    else:  # a flat folder of images, no labels: the unlabeled set MAE pretrains on
        (root / "src").mkdir(parents=True)
        for i in range(18):
            (root / "src" / f"img_{i:03d}.png").write_bytes(encode(rgb(i, (28 + i, 36))))
        m = pack(str(root / "src"), str(root / "shards"), "imagefolder", val_fraction=0.3, progress=False)
        assert m.task == "mae" and m.class_names == []
    return str(root / "shards"), m.num_classes


def _train_two_steps(task: str, root: Path, tracking_uri: str) -> tuple[str, list[bytes]]:
    """The task's data codec, training module and the real DeepSpeed engine (one gloo process), two optimizer steps,
    then the export the trainer writes; returns (export folder, val images)."""
    import pyarrow.parquet as pq
    import torch.distributed as dist

    from vitray.config import parse_config
    from vitray.data.formats import Manifest
    from vitray.data.pipeline import decode_batch, read_columns
    from vitray.train.export import gather_fp32_state_dict, write_export
    from vitray.train.loop import _prepare_cpu_deepspeed, build_engine
    from vitray.train.plan import make_plan
    from vitray.train.tasks import build_task

    shards, classes = _data(task, root)
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": classes},
                        "data": {"path": shards, "batch_size": 4}, "train": {"task": task, "steps": 2},
                        "cluster": {"num_workers": 1}, "tracking": {"uri": tracking_uri},
                        "detection": {"score_threshold": 0.05}})  # an untrained detector's scores are ~0.1
    m = Manifest.read(shards)
    table = pq.read_table(m.files(shards, "train")[0], columns=read_columns(task))
    rows = {k: table.column(k).to_pylist() for k in table.column_names}
    tr = {**cfg.data.train_transforms.model_dump(), "mean": cfg.data.mean}
    batch = {k: torch.from_numpy(v) for k, v in decode_batch(rows, task=task, train=True, img_size=32, transforms=tr,
                                                               max_pixels=10**6).items()}
    assert batch.pop("ok").all()
    t = build_task(cfg, m.class_names)
    plan = make_plan(cfg, m.counts["train"])
    _prepare_cpu_deepspeed()  # as a CPU worker does: no JIT build of DeepSpeed's shared-memory op
    if not dist.is_initialized():  # one gloo group for this test process (DeepSpeed caches its groups)
        for k in ("LOCAL_RANK", "RANK"):
            os.environ.setdefault(k, "0")  # what a launcher (Ray Train) sets
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    engine, _ = build_engine(cfg, plan, t.build_model())
    t.setup(torch.device("cpu"), torch.float32)
    for _ in range(2):
        loss = t.training_loss(engine, {k: v[:4] for k, v in batch.items()}, torch.float32)
        engine.backward(loss)
        engine.step()
    assert torch.isfinite(loss)
    export = root / "export"
    write_export(str(export), gather_fp32_state_dict(engine), cfg, m.class_names, metrics={"step": 2})
    val = pq.read_table(m.files(shards, "val")[0], columns=["image"]).column("image").to_pylist()[:3]
    return str(export), val


def _http_answer(task: str, body: dict, frame_row) -> None:
    """The HTTP answer and the pyfunc's row agree (per task: what each returns)."""
    if task == "classification":
        assert np.abs(np.asarray(body["probs"]) - np.asarray(frame_row["probs"])).max() <= 1e-5
    elif task == "mae":  # the encoder's pooled features (a backbone, not a classifier)
        assert body["dim"] == len(frame_row["embedding"]) == 96
        assert np.abs(np.asarray(body["embedding"]) - np.asarray(frame_row["embedding"])).max() <= 1e-5
    elif task == "detection":
        dets = body["detections"]
        assert dets and [d["class_id"] for d in dets] == list(frame_row["labels"])
        assert [d["label"] for d in dets] == list(frame_row["names"])
        assert np.abs(np.asarray([d["score"] for d in dets]) - np.asarray(frame_row["scores"])).max() <= 1e-5
        boxes = np.asarray([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in dets])
        assert np.abs(boxes - np.asarray(list(frame_row["boxes"]))).max() <= 1e-3
        assert body["image"] == {"width": int(frame_row["width"]), "height": int(frame_row["height"])}
    else:
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
        assert (served == np.asarray(Image.open(io.BytesIO(frame_row["mask"])))).all()
        assert body["image"] == {"width": served.shape[1], "height": served.shape[0]}


HTTP_PARAMS = {"classification": {"probs": "true"}, "segmentation": {}, "detection": {}, "mae": {}}


@pytest.fixture(scope="module")
def every_task(tmp_path_factory, ray_cluster):
    from ray import serve

    from vitray.config import TrackingConfig, parse_config
    from vitray.serve import app
    from vitray.tracking.registry import log_and_register

    root = tmp_path_factory.mktemp("tasks")
    tracking_uri = f"sqlite:///{root}/mlflow.db"
    out = {}
    for task in TASKED:
        export, val = _train_two_steps(task, root / task, tracking_uri)
        reg = log_and_register(export, TrackingConfig(uri=tracking_uri, registered_model=f"m-{task}"))
        out[task] = {"export": export, "val": val, "registered": reg}
    port = _free_port()
    # one replica per task on the session's 4-CPU Ray: half a CPU each leaves room for the ingress and the rest
    cfg = parse_config({"tracking": {"uri": tracking_uri}, "serve": {
        "port": port, "precision": "fp32", "cpus_per_replica": 0.5,
        "models": [{"name": f"m-{t}", "uri": f"models:/m-{t}@champion"} for t in TASKED]}})
    app.deploy(cfg)
    yield {"tasks": out, "url": f"http://127.0.0.1:{port}", "tracking_uri": tracking_uri}
    serve.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKED)
def test_every_task_trains_exports_reloads_and_answers_the_same_everywhere(task, every_task):
    import mlflow
    import pandas as pd
    import requests

    from vitray.models.export import load_export, read_export_meta
    from vitray.predict import Predictor
    from vitray.tasks import get_task
    from vitray.tracking.uris import tracking_scope

    t = every_task["tasks"][task]
    meta = read_export_meta(t["export"])
    assert meta["task"] == task and t["registered"].alias == "champion"
    model, _ = load_export(t["export"])
    direct = Predictor(model, meta).frame(t["val"])
    with tracking_scope(every_task["tracking_uri"]):
        pyfunc = mlflow.pyfunc.load_model(f"models:/m-{task}@champion").predict(pd.DataFrame({"image": t["val"]}))
    assert list(pyfunc.columns) == list(direct.columns)
    for i in range(len(t["val"])):
        _http_answer(task, _row_as_body(task, direct.iloc[i]), pyfunc.iloc[i])  # export == registered pyfunc
        r = requests.post(every_task["url"] + get_task(task).route, data=t["val"][i], timeout=60,
                          params={"model": f"m-{task}", **HTTP_PARAMS[task]}, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == f"m-{task}" and r.json()["version"] == "1"
        _http_answer(task, r.json(), pyfunc.iloc[i])
    # the route of another task does not serve this model
    other = next(x for x in TASKED if x != task)
    r = requests.post(every_task["url"] + get_task(other).route, data=t["val"][0], timeout=60,
                      params={"model": f"m-{task}"}, headers={"content-type": "image/png"})
    assert r.status_code == 404 and f"no {other} model" in r.json()["error"]
    models = requests.get(every_task["url"] + "/v1/models", timeout=30).json()["models"]
    assert {m["name"]: (m["task"], m["route"]) for m in models}[f"m-{task}"] == (task, get_task(task).route)


def _row_as_body(task: str, row) -> dict:
    """The direct predictor's row in the shape of an HTTP answer (to compare it with the pyfunc the same way)."""
    if task == "classification":
        return {"probs": row["probs"]}
    if task == "mae":
        return {"dim": len(row["embedding"]), "embedding": row["embedding"]}
    if task == "detection":
        return {"image": {"width": int(row["width"]), "height": int(row["height"])},
                "detections": [{"label": n, "class_id": int(c), "score": float(s), "box": dict(zip(
                    ("xmin", "ymin", "xmax", "ymax"), map(float, b)))}
                    for b, s, c, n in zip(row["boxes"], row["scores"], row["labels"], row["names"])]}
    mask = np.asarray(Image.open(io.BytesIO(row["mask"])))
    return {"mask_png": base64.b64encode(row["mask"]).decode(), "image": {"width": mask.shape[1], "height": mask.shape[0]}}


@pytest.mark.parametrize("task", TASKED)
def test_validation_decodes_an_image_exactly_as_serving_does(task):
    """The val pipeline's decode + eval transform and the predictor's prepare give the same pixels, for a large JPEG
    too (the train path may decode JPEGs at a reduced DCT scale; validation must not, or the gated metric would not
    be the served model's)."""
    from vitray.data.pipeline import decode_batch
    from vitray.predict import prepare

    big = encode(rgb(3, (640, 480)), "JPEG", quality=90)
    meta = {"task": task, "preprocessing": {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875,
                                            "interpolation": "bicubic"}}
    row = {"image": [big], "label": [0], "mask": [encode(Image.new("L", (640, 480), 1))], "boxes": [[[8, 8, 40, 60]]],
           "box_labels": [[0]], "box_crowd": [[False]], "width": [640], "height": [480]}
    val = decode_batch(row, task=task, train=False, img_size=32, transforms={"crop_pct": 0.875}, max_pixels=10**8)
    served, size = prepare(big, meta)
    assert size == (480, 640) and (val["image"][0] == served).all()


def test_segmentation_fine_tunes_from_a_classifier_export_with_a_new_head(tmp_path):
    """A classification export initialises the segmenter's backbone (its classifier dropped, the decoder new); a
    segmentation export initialises the decoder too."""
    from vitray.config import parse_config
    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.tasks import get_task

    torch.manual_seed(0)
    clf = create_model("vit_pico_patch4_32", num_classes=10)
    pre = {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bicubic"}
    save_export(tmp_path / "clf", clf.state_dict(), task="classification", class_names=[str(i) for i in range(10)],
                preprocessing=pre, model={"name": "vit_pico_patch4_32", "num_classes": 10, "img_size": 32,
                                          "in_chans": 3, "pos_embed": "learned", "global_pool": "token"})
    arch = get_task("segmentation").load("model")
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 4, "img_size": 32,
                                  "checkpoint": str(tmp_path / "clf")}, "train": {"task": "segmentation"}})
    seg = arch.for_training(cfg)
    own = clf.state_dict()
    for k, v in seg.backbone.state_dict().items():
        assert torch.equal(v, own[k]), k
    assert not any(k.startswith("head.") and own[k].shape == v.shape for k, v in seg.backbone.state_dict().items())
    save_export(tmp_path / "seg", seg.state_dict(), task="segmentation", class_names=list("abcd"), preprocessing=pre,
                model=arch.arch(cfg, 32))
    again = arch.for_training(parse_config({**cfg.model_dump(mode="json"),
                                            "model": {**cfg.model.model_dump(), "checkpoint": str(tmp_path / "seg")}}))
    for k, v in seg.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_segmentation_layer_decay_groups_the_backbone_like_timm_and_the_decoder_at_full_lr():
    from vitray.config import parse_config
    from vitray.tasks import get_task
    from vitray.train.optim import param_groups

    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 4}, "train": {"task": "segmentation"}})
    model = get_task("segmentation").load("model").for_training(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in param_groups(model, 0.05, layer_decay=0.5) for p in g["params"]}
    assert scale["backbone.patch_embed.proj.weight"] == scale["backbone.cls_token"] == pytest.approx(0.5 ** 5)
    assert scale["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.5 ** 4)
    assert scale["backbone.blocks.3.attn.qkv.weight"] == pytest.approx(0.5)
    assert {v for k, v in scale.items() if k.startswith("decoder.")} == {1.0}
