"""Semantic segmentation end to end, as `vitray quickstart --task segmentation` runs it: scenes composed from
scikit-learn's bundled digits, packed as a mask folder, trained on 2 Ray Train workers with DeepSpeed, registered in
MLflow, scored with `vitray score` and served by Ray Serve; then the same masks from every path, for images of
other sizes than the model's, and the bad inputs a server meets."""
from __future__ import annotations

import base64
import io
import socket

import numpy as np
import pytest
import requests
from PIL import Image

from imagegen import encode

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def seg(ray_cluster, tmp_path_factory):
    from ray import serve

    from vitray.config import parse_config
    from vitray.quickstart import run_quickstart
    from vitray.serve import app

    home = tmp_path_factory.mktemp("seg")
    result = run_quickstart(home=str(home), task="segmentation")
    port = _free_port()
    cfg = parse_config({"tracking": {"uri": result.tracking_uri}, "serve": {
        "port": port, "precision": "fp32", "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
        "models": [{"name": "scenes", "uri": result.model_uri, "task": "segmentation"}]}})
    app.deploy(cfg)
    yield result, f"http://127.0.0.1:{port}"
    serve.shutdown()


def _val(result, n: int = 8) -> tuple[list[str], list[bytes], list[np.ndarray]]:
    import pyarrow.parquet as pq

    from vitray.data.formats import Manifest

    m = Manifest.read(result.shards)
    t = pq.read_table(m.files(result.shards, "val")[0], columns=["id", "image", "mask"]).slice(0, n).to_pylist()
    return [r["id"] for r in t], [r["image"] for r in t], [_png(r["mask"]) for r in t]


def _segment(url: str, image: bytes, **params) -> requests.Response:
    return requests.post(f"{url}/v1/segment", data=image, params={"model": "scenes", **params},
                         headers={"content-type": "image/png"}, timeout=60)


def test_trains_to_miou_0_6_and_tracks_it(seg):
    from vitray.tracking.uris import client_for

    result, _ = seg
    assert result.metrics["val/miou"] >= 0.6, result.metrics
    assert result.metrics["val/pixel_acc"] > 0.9 and result.metrics["val/iou/background"] > 0.9
    client = client_for(result.tracking_uri)
    run_id = client.get_model_version_by_alias("digit-scenes-seg", "champion").run_id
    run = client.get_run(run_id)
    assert {"val/miou", "val/pixel_acc", "val/iou/0", "val/iou/1", "val/iou/2", "train/loss"} <= set(run.data.metrics)
    pictures = [f.path for f in client.list_artifacts(run_id, "pictures")]
    assert "pictures/val_segmentation.png" in pictures  # image | truth | prediction, as a picture
    assert result.metrics["val/miou"] == pytest.approx(run.data.metrics["val/miou"])


def test_served_mask_equals_pyfunc_mask_equals_scored_mask(seg, tmp_path):
    """At one precision (fp32: the pyfunc's): the quickstart scored in bf16, where this CPU has it."""
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from vitray.batch import score
    from vitray.config import TrackingConfig
    from vitray.data.formats import Manifest
    from vitray.tracking.uris import tracking_scope

    result, url = seg
    ids, images, _ = _val(result)
    assert pq.read_table(result.predictions).num_rows == 2000  # the quickstart scored every packed scene
    val = Manifest.read(result.shards).files(result.shards, "val")[0]
    score(result.model_uri, val, str(tmp_path / "scored"), precision="fp32",
          tracking_cfg=TrackingConfig(uri=result.tracking_uri))
    scored = {r["id"]: r for r in pq.read_table(tmp_path / "scored").to_pylist() if r["id"] in set(ids)}
    assert len(scored) == len(ids)
    with tracking_scope(result.tracking_uri):
        frame = mlflow.pyfunc.load_model(result.model_uri).predict(pd.DataFrame({"image": images}))
    for i, (sid, image) in enumerate(zip(ids, images)):
        r = _segment(url, image)
        assert r.status_code == 200, r.text
        body = r.json()
        served = _png(base64.b64decode(body["mask_png"]))
        assert (served == _png(frame["mask"][i])).all() and (served == _png(scored[sid]["mask"])).all(), sid
        areas = {k: int(v) for k, v in scored[sid]["class_areas"]}
        assert body["class_areas"] == areas and sum(areas.values()) == served.size
        assert body["labels"] == ["background", "0", "1", "2"] and body["image"] == {"width": 32, "height": 32}


def test_a_mask_for_an_image_of_another_size_lines_up_with_it(seg):
    """A val scene stretched to 80 x 48: the mask comes back 80 x 48 and agrees with the stretched truth about as
    well as the native-size mask agrees with the native truth; ?format=rle decodes to the same mask."""
    from pycocotools import mask as coco_mask

    result, url = seg
    _, images, truths = _val(result, 16)
    native_ok = big_ok = pixels = big_pixels = 0
    for image, truth in zip(images, truths):
        native = _png(base64.b64decode(_segment(url, image).json()["mask_png"]))
        native_ok += int((native == truth).sum())
        pixels += truth.size
        big = encode(Image.open(io.BytesIO(image)).convert("RGB").resize((80, 48), Image.BICUBIC))
        big_truth = np.asarray(Image.fromarray(truth).resize((80, 48), Image.NEAREST))
        body = _segment(url, big).json()
        mask = _png(base64.b64decode(body["mask_png"]))
        assert mask.shape == (48, 80) and body["image"] == {"width": 80, "height": 48}
        big_ok += int((mask == big_truth).sum())
        big_pixels += big_truth.size
        rle = _segment(url, big, format="rle").json()
        assert "mask_png" not in rle
        rebuilt = np.zeros((48, 80), np.uint8)
        for r in rle["rle"]:
            rebuilt[coco_mask.decode({"size": r["size"], "counts": r["counts"].encode()}).astype(bool)] = r["class_id"]
        assert (rebuilt == mask).all()
    assert big_ok / big_pixels > 0.9 and big_ok / big_pixels >= native_ok / pixels - 0.03


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(seg):
    result, url = seg
    _, images, _ = _val(result, 1)
    cases = [
        ("not an image", lambda: _segment(url, b"nope"), 400, "not an image"),
        ("truncated png", lambda: _segment(url, images[0][: len(images[0]) // 2]), 400, ""),
        ("unknown format", lambda: _segment(url, images[0], format="svg"), 400, "format"),
        ("unknown parameter", lambda: _segment(url, images[0], top_k=3), 400, "top_k"),
        ("unknown model", lambda: requests.post(f"{url}/v1/segment", params={"model": "nope"}, data=images[0],
                                                headers={"content-type": "image/png"}, timeout=60), 404, "nope"),
        ("no classifier served", lambda: requests.post(f"{url}/v1/classify", data=images[0], timeout=60,
                                                       headers={"content-type": "image/png"}), 404,
         "no classification model"),
    ]
    for name, send, status, words in cases:
        r = send()
        assert r.status_code == status, (name, r.status_code, r.text)
        assert set(r.json()) == {"error"} and words in r.json()["error"], (name, r.text)
        assert _segment(url, images[0]).status_code == 200, name


def test_scoring_keeps_bad_images_as_error_rows_and_fails_when_most_are(seg, tmp_path):
    import pyarrow.parquet as pq

    from vitray.batch import score
    from vitray.batch.score import ScoreError
    from vitray.config import TrackingConfig

    result, _ = seg
    _, images, _ = _val(result, 1)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(images[0])
    for i in range(3):
        (folder / f"b_bad{i}.png").write_bytes(b"not a png at all")
    with pytest.raises(ScoreError, match="3 of 4 rows are errors"):
        score(result.model_uri, str(folder), str(tmp_path / "out"), tracking_cfg=TrackingConfig(enabled=False,
                                                                                                 uri=result.tracking_uri))
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert rows["a_good.png"]["error"] is None and _png(rows["a_good.png"]["mask"]).shape == (32, 32)
    assert all(rows[f"b_bad{i}.png"]["mask"] is None and "not an image" in rows[f"b_bad{i}.png"]["error"]
               for i in range(3))
