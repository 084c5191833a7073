"""Object detection: CenterNet's targets, loss and decoding, the COCO evaluator against pycocotools, boxes mapped back
to the original image, and (slow) the task end to end as `vitray quickstart --task detection` runs it: scenes
composed from scikit-learn's bundled digits (val scenes with held-out digits), packed from the COCO annotations,
trained on 2 Ray Train workers with DeepSpeed, registered in MLflow, scored and served, then the same boxes from
every path, for images of other sizes and shapes, and the bad inputs a server meets."""
from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from imagegen import encode, rgb

PRE = {"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875, "interpolation": "bicubic"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ CenterNet
def test_perfect_outputs_decode_to_the_true_boxes_and_crowd_regions_are_ignored():
    from vitray.models.centernet import centernet_decode, centernet_loss, centernet_targets

    boxes = torch.tensor([[[4., 4., 20., 30.], [30., 30., 60., 50.], [0., 0., 0., 0.]],
                          [[10., 10., 40., 40.], [0., 0., 64., 64.], [0., 0., 0., 0.]]])
    labels = torch.tensor([[0, 2, -1], [1, 1, -1]])
    crowd = torch.tensor([[False, False, False], [False, True, False]])
    t = centernet_targets(boxes, labels, 3, (16, 16), 4, crowd)
    assert int((t["heat"] == 1).sum()) == 3  # one peak per object, none for the crowd box or the padding
    assert t["ignore"][0].sum() == 0 and t["ignore"][1].sum() == 16 * 16 - 1  # all of image 1 but its object's peak
    perfect = torch.full((2, 7, 16, 16), -30.0)
    perfect[:, :3] = torch.logit(t["heat"].clamp(1e-6, 1 - 1e-6))
    for b, cell, size, off in zip(t["b"], t["cell"], t["size"], t["offset"]):
        perfect[b, 3:5, cell[1], cell[0]], perfect[b, 5:7, cell[1], cell[0]] = size, off
    decoded = centernet_decode(perfect, 4, (64, 64), k=5, nms_iou=0.7, min_score=0.5)
    assert torch.allclose(decoded[0][0], boxes[0, :2]) and decoded[0][2].tolist() == [0, 2]
    assert torch.allclose(decoded[1][0], boxes[1, :1]) and decoded[1][2].tolist() == [1]
    loss, parts = centernet_loss(perfect, boxes, labels, 4, crowd)
    assert parts["size"] == 0 and parts["offset"] == 0 and loss < 0.05
    # crowd cells leave the loss alone: confident nonsense inside the crowd box costs nothing
    noisy = perfect.clone()
    noisy[1, 0, 0, 0] = 5.0
    assert centernet_loss(noisy, boxes, labels, 4, crowd)[0] == pytest.approx(float(loss), abs=1e-6)
    assert centernet_loss(noisy, boxes, labels, 4, None)[0] > loss + 1  # without the crowd flag it would


def test_pyramid_levels_follow_the_input_size_and_the_head_runs_at_stride_4():
    from timm.models.vision_transformer import VisionTransformer

    from vitray.models import create_model
    from vitray.models.detection import DetectionViT, pyramid_strides

    assert pyramid_strides(224) == [4, 8, 16, 32] and pyramid_strides(32) == [4, 8, 16] and pyramid_strides(16) == [4, 8]
    for name, size in (("vit_pico_patch4_32", 32), ("vit_pico_patch8_64", 64)):
        m = DetectionViT(create_model(name, num_classes=0, img_size=size), 5, size).eval()
        assert m(torch.zeros(2, 3, size, size)).shape == (2, 9, size // 4, size // 4)
    # ViT-B/16's layout (patch 16), narrow so it runs in a blink: 4x, 2x, 1x, 0.5x of the stride-16 map
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=1, num_heads=2, num_classes=0)
    m = DetectionViT(vit, 3, 224).eval()
    grid = torch.zeros(1, 64, 14, 14)
    assert [tuple(x.shape[-2:]) for x in m.pyramid(grid, (224, 224))] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 7, 56, 56)


# ------------------------------------------------------------------------------------------------ evaluation
def _scenes_truths(tmp_path, n=60):
    from vitray.data.compose import compose

    compose("-", str(tmp_path / "s"), source="sklearn-digits", classes="0,1,2", n=n, size=64, seed=1)
    coco = json.loads((tmp_path / "s" / "annotations.json").read_text())
    per = {im["id"]: ([], [], []) for im in coco["images"]}
    for k, a in enumerate(coco["annotations"]):
        x, y, w, h = a["bbox"]
        per[a["image_id"]][0].append([x, y, x + w, y + h])
        per[a["image_id"]][1].append(a["category_id"] - 1)
        per[a["image_id"]][2].append(k % 11 == 0)  # a few crowd regions
    return [tuple(np.asarray(v, dtype=np.float32 if i == 0 else (np.int64 if i == 1 else bool)).reshape(
        (-1, 4) if i == 0 else (-1,)) for i, v in enumerate(per[im["id"]])) for im in coco["images"]]


def test_the_evaluator_gives_pycocotools_stats_on_the_same_detections(tmp_path):
    from vitray.tasks.detection.evaluate import STAT_NAMES, coco_stats

    truths = _scenes_truths(tmp_path)
    rng = np.random.default_rng(0)
    dets = []
    for boxes, labels, _ in truths:  # jittered true boxes (some missed, some relabelled) plus false positives
        keep = rng.random(len(boxes)) > 0.15
        b = boxes[keep] + rng.normal(0, 1.0, (int(keep.sum()), 4)).astype(np.float32)
        lab = np.where(rng.random(int(keep.sum())) < 0.1, (labels[keep] + 1) % 3, labels[keep])
        fp = rng.uniform(0, 48, (3, 2)).astype(np.float32)
        b = np.concatenate([b, np.concatenate([fp, fp + rng.uniform(6, 16, (3, 2))], axis=1)])
        dets.append((b, rng.uniform(0.05, 1.0, len(b)).astype(np.float32),
                     np.concatenate([lab, rng.integers(0, 3, 3)])))
    sizes = [(64, 64)] * len(truths)
    fast = coco_stats(truths, dets, sizes, 3)
    oracle = coco_stats(truths, dets, sizes, 3, backend="pycocotools")
    assert list(fast) == list(STAT_NAMES) and 0.1 < fast["val/map"] < 0.9
    assert fast == pytest.approx(oracle, abs=1e-12)
    assert coco_stats(truths, [(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))] * len(truths), sizes, 3)["val/map"] == 0


def test_detections_are_gathered_from_every_worker_and_evaluated_once(tmp_path):
    """Two workers' halves of the val split, gathered: the stats of the whole split (not a mean of two mAPs)."""
    from vitray.config import parse_config
    from vitray.tasks.detection.evaluate import coco_stats
    from vitray.train.tasks import build_task

    truths = _scenes_truths(tmp_path, 40)
    rng = np.random.default_rng(1)
    dets = [(b + rng.normal(0, 3, b.shape).astype(np.float32), rng.uniform(0.1, 1, len(b)).astype(np.float32), lab)
            for b, lab, _ in truths]
    cfg = parse_config({"model": {"name": "vit_pico_patch8_64", "num_classes": 3}, "train": {"task": "detection"}})
    task = build_task(cfg, ["0", "1", "2"])
    halves = []
    for part in (slice(0, 13), slice(13, None)):
        m = task.metric()
        m.truths, m.detections, m.sizes = truths[part], dets[part], [(64, 64)] * len(truths[part])
        m.loss = torch.tensor([1.0, 1.0], dtype=torch.float64)
        halves.append(m)
    shared = [(h.truths, h.detections, h.sizes) for h in halves]
    for m in halves:
        m.sync(lambda t: t * 2, lambda obj: shared)  # what every rank receives from all_gather_object
    whole = coco_stats(truths, dets, [(64, 64)] * len(truths), 3)
    for m in halves:
        assert m.compute()["val/map"] == pytest.approx(whole["val/map"], abs=1e-12) and len(m.sizes) == 40
    alone = [coco_stats(truths[p], dets[p], [(64, 64)] * len(truths[p]), 3)["val/map"] for p in (slice(0, 13),
                                                                                                 slice(13, None))]
    assert abs(np.mean(alone) - whole["val/map"]) > 1e-6  # a mean of the halves would not be the split's mAP


# ------------------------------------------------------------------------------------------------ geometry
class _OnePeak(torch.nn.Module):
    """A detector that always finds one object of class 1 centred in cell (x 5, y 2) of its 8 x 8 output grid, 2
    cells wide and 3 tall, offset half a cell: in its 32 px input, the box (18, 4, 26, 16)."""

    def forward(self, x):
        out = torch.full((len(x), 3 + 4, 8, 8), -20.0)
        out[:, 1, 2, 5] = 3.0
        out[:, 3:5, 2, 5] = torch.tensor([2.0, 3.0])
        out[:, 5:7, 2, 5] = 0.5
        return out


def test_boxes_map_back_to_the_original_image_of_any_size_and_shape():
    from vitray.predict import Predictor

    meta = {"task": "detection", "class_names": ["a", "b", "c"], "preprocessing": PRE,
            "model": {"name": "x", "img_size": 32, "max_detections": 10, "nms_iou": 0.7, "score_threshold": 0.5}}
    p = Predictor(_OnePeak(), meta)
    for w, h in ((32, 32), (97, 53), (20, 140), (640, 480)):
        (answer,) = p.predict([encode(rgb(1, (w, h)))])
        sx, sy = w / 32, h / 32
        assert np.allclose(answer["boxes"], [[18 * sx, 4 * sy, 26 * sx, 16 * sy]], atol=1e-3), (w, h)
        assert answer["labels"].tolist() == [1] and answer["scores"][0] == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))))
        frame = p.frame([encode(rgb(1, (w, h)))])
        assert frame["names"][0] == ["b"] and (frame["width"][0], frame["height"][0]) == (w, h)
        assert np.allclose(frame["boxes"][0], answer["boxes"], atol=1e-3)


def test_coco_answers_use_the_source_category_ids_and_bad_labels_are_named():
    from vitray.models.centernet import centernet_targets
    from vitray.predict import Predictor
    from vitray.tasks.detection.infer import HEAD, DetectParams

    meta = {"task": "detection", "class_names": ["a", "b", "c"], "preprocessing": PRE, "category_ids": [3, 7, 90],
            "model": {"name": "x", "img_size": 32, "max_detections": 10, "nms_iou": 0.7, "score_threshold": 0.5}}
    (answer,) = Predictor(_OnePeak(), meta).predict([encode(rgb(1, (64, 64)))])
    body = HEAD.respond(answer, (64, 64), DetectParams(format="coco", image_id=42), meta)
    assert [(r["image_id"], r["category_id"]) for r in body["results"]] == [(42, 7)]  # class 1 -> COCO category 7
    assert body["results"][0]["bbox"] == pytest.approx([36, 8, 16, 24], abs=1e-3)
    del meta["category_ids"]  # a model trained on a pack without them (a mask folder turned into boxes, ...)
    assert HEAD.respond(answer, (64, 64), DetectParams(format="coco"), meta)["results"][0]["category_id"] == 2
    with pytest.raises(ValueError, match="box label is 5 but the model has 3 classes"):
        centernet_targets(torch.tensor([[[1.0, 1, 9, 9]]]), torch.tensor([[5]]), 3, (8, 8), 4)


def test_detection_shards_packed_before_crowd_flags_still_train_and_evaluate(tmp_path):
    """Shards written before ``box_crowd`` existed: the pipeline reads what they have, no box is a crowd."""
    import pyarrow.parquet as pq

    from vitray.data.compose import compose
    from vitray.data.formats import Manifest
    from vitray.data.pack import pack
    from vitray.data.pipeline import decode_batch, read_columns

    compose("-", str(tmp_path / "s"), source="sklearn-digits", classes="0,1", n=12, size=32)
    pack(str(tmp_path / "s" / "annotations.json"), str(tmp_path / "shards"), "coco", images=str(tmp_path / "s" / "images"),
         val_fraction=0.0, progress=False)
    (f,) = Manifest.read(tmp_path / "shards").files(str(tmp_path / "shards"), "train")
    pq.write_table(pq.read_table(f).drop_columns(["box_crowd"]), f)  # as the older vitray wrote it
    cols = read_columns("detection", [f])
    assert "box_crowd" not in cols and {"boxes", "box_labels"} <= set(cols)
    t = pq.read_table(f, columns=cols)
    batch = decode_batch({k: t.column(k).to_pylist() for k in cols}, task="detection", train=False, img_size=32,
                         transforms={"crop_pct": 1.0}, max_pixels=10**6, max_boxes=8)
    assert batch["ok"].all() and (batch["box_labels"] >= 0).sum() >= 12 and not batch["box_crowd"].any()


def test_a_detector_fine_tunes_from_a_classifier_export_and_from_its_own(tmp_path):
    """A classification export initialises the backbone (its classifier dropped); a detection export initialises
    the pyramid and the head too; layer decay groups the backbone like timm and trains the rest at full lr."""
    from vitray.config import parse_config
    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.tasks import get_task
    from vitray.train.optim import param_groups

    torch.manual_seed(0)
    clf = create_model("vit_pico_patch8_64", num_classes=10)
    pre = {**PRE, "img_size": 64}
    save_export(tmp_path / "clf", clf.state_dict(), task="classification", class_names=[str(i) for i in range(10)],
                preprocessing=pre, model={"name": "vit_pico_patch8_64", "num_classes": 10, "img_size": 64,
                                          "in_chans": 3, "pos_embed": "learned", "global_pool": "token"})
    arch = get_task("detection").load("model")
    cfg = parse_config({"model": {"name": "vit_pico_patch8_64", "num_classes": 3, "img_size": 64,
                                  "checkpoint": str(tmp_path / "clf")}, "train": {"task": "detection"}})
    det = arch.for_training(cfg)
    own = clf.state_dict()
    for k, v in det.backbone.state_dict().items():
        assert torch.equal(v, own[k]), k
    save_export(tmp_path / "det", det.state_dict(), task="detection", class_names=list("abc"), preprocessing=pre,
                model=arch.arch(cfg, 64))
    again = arch.for_training(parse_config({**cfg.model_dump(mode="json"),
                                            "model": {**cfg.model.model_dump(), "checkpoint": str(tmp_path / "det")}}))
    for k, v in det.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    names = {id(p): n for n, p in det.named_parameters()}
    scale = {names[id(p)]: g["lr_scale"] for g in param_groups(det, 0.05, layer_decay=0.5) for p in g["params"]}
    assert scale["backbone.patch_embed.proj.weight"] == pytest.approx(0.5 ** 5)
    assert {v for k, v in scale.items() if k.startswith(("pyramid.", "head."))} == {1.0}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def det(ray_cluster, tmp_path_factory):
    from ray import serve

    from vitray.config import parse_config
    from vitray.quickstart import run_quickstart
    from vitray.serve import app

    home = tmp_path_factory.mktemp("det")
    result = run_quickstart(home=str(home), task="detection", overrides=["score.precision=fp32"])
    port = _free_port()
    cfg = parse_config({"tracking": {"uri": result.tracking_uri}, "serve": {
        "port": port, "precision": "fp32", "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
        "models": [{"name": "scenes", "uri": result.model_uri, "task": "detection"}]}})
    app.deploy(cfg)
    yield result, f"http://127.0.0.1:{port}"
    serve.shutdown()


def _val(result, n: int = 8):
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

    m = Manifest.read(result.shards)
    t = pq.read_table(m.files(result.shards, "val")[0], columns=["id", "image"]).slice(0, n).to_pylist()
    return [r["id"] for r in t], [r["image"] for r in t]


def _detect(url: str, image: bytes, **params) -> requests.Response:
    return requests.post(f"{url}/v1/detect", data=image, params={"model": "scenes", **params},
                         headers={"content-type": "image/png"}, timeout=60)


def _boxes(body: dict, min_score: float = 0.0) -> list[tuple[int, float, np.ndarray]]:
    return [(d["class_id"], d["score"], np.array([d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]))
            for d in body["detections"] if d["score"] >= min_score]


@pytest.mark.slow
def test_trains_to_map_0_45_on_held_out_digits_and_tracks_it(det):
    from vitray.tracking.uris import client_for

    result, _ = det
    assert result.metrics["val/map"] >= 0.45, result.metrics
    assert result.metrics["val/map50"] > result.metrics["val/map"] and result.metrics["val/images"] == 400
    client = client_for(result.tracking_uri)
    run_id = client.get_model_version_by_alias("digit-scenes-det", "champion").run_id
    run = client.get_run(run_id)
    assert {"val/map", "val/map50", "val/map75", "val/mar100", "train/loss"} <= set(run.data.metrics)
    assert "pictures/val_detections.png" in [f.path for f in client.list_artifacts(run_id, "pictures")]
    assert result.metrics["val/map"] == pytest.approx(run.data.metrics["val/map"])


@pytest.mark.slow
def test_served_boxes_equal_pyfunc_boxes_equal_scored_boxes(det):
    """All at fp32 (the quickstart ran with score.precision=fp32)."""
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from vitray.tracking.uris import tracking_scope

    result, url = det
    ids, images = _val(result)
    scored = {r["id"]: r for r in pq.read_table(result.predictions).to_pylist() if r["id"] in set(ids)}
    assert len(scored) == len(ids) and pq.read_table(result.predictions).num_rows == 2000
    with tracking_scope(result.tracking_uri):
        frame = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"image": images}))
    found = 0
    for i, (sid, image) in enumerate(zip(ids, images)):
        r = _detect(url, image)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image"] == {"width": 64, "height": 64} and body["model"] == "scenes"
        served = _boxes(body)
        rows = scored[sid]["detections"]
        assert [c for c, _, _ in served] == list(frame["labels"][i]) == [d["class_id"] for d in rows]
        for (c, s, box), fbox, fs, d in zip(served, frame["boxes"][i], frame["scores"][i], rows):
            assert np.abs(box - np.asarray(fbox)).max() < 1e-3 and abs(s - fs) < 1e-5
            assert np.abs(box - np.array([d["xmin"], d["ymin"], d["xmax"], d["ymax"]])).max() < 1e-3
            assert abs(s - d["score"]) < 1e-5 and d["label"] == str(c)
        found += len(served)
        coco = _detect(url, image, format="coco").json()["results"]
        assert [r["category_id"] - 1 for r in coco] == [c for c, _, _ in served]
        assert np.allclose([r["bbox"] for r in coco], [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for _, _, b in served],
                           atol=1e-4)
    assert found >= len(ids)  # the val scenes hold 1-3 digits each


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def _agree(small: dict, big: dict, scale_x: float, scale_y: float) -> tuple[list[float], int]:
    """(gaps, missed): a confident box of ``small`` is matched by the same-class box of ``big`` that overlaps it most
    after scaling (IoU >= 0.5); a gap is the largest coordinate difference of a matched pair, in ``small``'s pixels.
    The resampled image is not the same input to the model, so a borderline object may drop below the score cut in
    one of the two (a miss) and a weak box may move a pixel or two; a wrong mapping (scale, offset, letterbox) moves
    every box, by many pixels, or leaves nothing matched."""
    scale = np.array([scale_x, scale_y, scale_x, scale_y])
    others = [(k, b / scale) for k, _, b in _boxes(big, 0.2)]
    gaps, missed = [], 0
    for c, _, box in _boxes(small, 0.4):
        best = max((b for k, b in others if k == c), key=lambda b: _iou(b, box), default=None)
        if best is None or _iou(best, box) < 0.5:
            missed += 1
        else:
            gaps.append(float(np.abs(best - box).max()))
    return gaps, missed


@pytest.mark.slow
def test_boxes_of_an_image_and_of_it_resized_2x_agree_square_or_letterboxed(det):
    result, url = det
    _, images = _val(result, 12)
    gaps, missed = [], 0
    for image in images:
        pic = Image.open(io.BytesIO(image)).convert("RGB")
        for base in (pic, Image.new("RGB", (96, 64), (20, 20, 20))):  # the scene, and letterboxed into 96 x 64
            if base is not pic:
                base.paste(pic, (16, 0))
            w, h = base.size
            one = _detect(url, encode(base)).json()
            two = _detect(url, encode(base.resize((2 * w, 2 * h), Image.BICUBIC))).json()
            assert one["image"] == {"width": w, "height": h} and two["image"] == {"width": 2 * w, "height": 2 * h}
            for _, _, b in _boxes(one):
                assert 0 <= b[0] <= b[2] <= w and 0 <= b[1] <= b[3] <= h
            g, x = _agree(one, two, 2.0, 2.0)
            gaps, missed = gaps + g, missed + x
    assert len(gaps) >= 12 and missed <= max(2, len(gaps) // 10), (len(gaps), missed)
    within = float(np.mean(np.array(gaps) <= 1.0))
    assert np.median(gaps) <= 0.5 and within >= 0.9, (within, [round(g, 2) for g in sorted(gaps)])


@pytest.mark.slow
def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(det):
    result, url = det
    _, images = _val(result, 1)
    cases = [
        ("not an image", lambda: _detect(url, b"nope"), 400, "not an image"),
        ("threshold out of range", lambda: _detect(url, images[0], score_threshold=2), 400, "score_threshold"),
        ("max_detections 0", lambda: _detect(url, images[0], max_detections=0), 400, "max_detections"),
        ("unknown format", lambda: _detect(url, images[0], format="svg"), 400, "format"),
        ("unknown parameter", lambda: _detect(url, images[0], top_k=3), 400, "top_k"),
        ("no segmenter served", lambda: requests.post(f"{url}/v1/segment", data=images[0], timeout=60,
                                                      headers={"content-type": "image/png"}), 404, "segmentation"),
    ]
    for what, call, status, words in cases:
        r = call()
        assert r.status_code == status, (what, r.status_code, r.text)
        assert words in r.json()["error"], (what, r.json())
    full = _detect(url, images[0], score_threshold=0).json()["detections"]
    assert len(full) in range(2, 101) and [d["score"] for d in full] == sorted((d["score"] for d in full), reverse=True)
    assert _detect(url, images[0], score_threshold=0, max_detections=2).json()["detections"] == full[:2]
    assert _detect(url, images[0]).status_code == 200  # still serving
