"""Decoding odd images, transforms that keep boxes and masks on the pixels, and the Ray Data pipeline's batches."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagegen import encode, make_coco, make_imagefolder, make_masks, make_webdataset, rgb
from vitray.config import DataConfig
from vitray.data import DecodeError, decode_image, schema_for
from vitray.data.decode import exif_orientation
from vitray.data.pack import pack
from vitray.data.transforms import EvalTransform, TrainTransform, make_mixup, normalize_batch


# ------------------------------------------------------------------------------------------------- decoding
def test_modes_convert_to_rgb():
    base = rgb(1, (16, 12))
    arr = np.asarray(base)
    cases = {
        "L": encode(base.convert("L")),
        "P": encode(base.convert("P")),
        "RGBA": encode(base.convert("RGBA")),
        "CMYK": encode(base.convert("CMYK"), "JPEG", quality=95),
        "I;16": encode(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)),
        "LA": encode(base.convert("LA")),
    }
    for mode, data in cases.items():
        out = decode_image(data)
        assert out.shape == (12, 16, 3) and out.dtype == np.uint8, mode
    gray = np.asarray(base.convert("L"))
    np.testing.assert_array_equal(decode_image(cases["I;16"])[..., 0], gray)  # 16-bit scaled back to 8
    np.testing.assert_array_equal(decode_image(cases["RGBA"]), arr)
    # transparent pixels are flattened on white
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert (decode_image(encode(Image.fromarray(rgba, "RGBA"))) == 255).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(orientation):
    img = rgb(3, (40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "JPEG", quality=95, exif=exif.tobytes())
    assert exif_orientation(data) == orientation
    out = decode_image(data)
    expected = (20, 40) if orientation <= 4 else (40, 20)
    assert out.shape[:2] == expected
    from PIL import ImageOps

    ref = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    np.testing.assert_array_equal(out, ref)


def test_fast_jpeg_path_matches_pil():
    data = encode(rgb(5, (96, 64)), "JPEG", quality=90)
    fast = decode_image(data).astype(int)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(fast - ref).max() <= 1
    small = decode_image(data, min_size=(16, 24))  # DCT-scaled decode never goes below the asked size
    assert small.shape[0] >= 16 and small.shape[1] >= 24 and small.shape[0] < 64


def test_decode_errors_are_clear():
    for data, reason in ((b"", "empty"), (b"garbage bytes", "not an image")):
        with pytest.raises(DecodeError, match=reason):
            decode_image(data)
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(encode(Image.new("L", (300, 300))), max_pixels=10_000)
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_image(encode(Image.new("RGB", (300, 300)), "JPEG"), max_pixels=10_000)


# ----------------------------------------------------------------------------------------------- transforms
def _scene(h=60, w=80, box=(20, 10, 50, 40)):
    img = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return img, np.array([box], np.float32), np.array([4]), mask


@pytest.mark.parametrize("seed", range(25))
def test_train_transform_keeps_box_and_mask_on_pixels(seed):
    img, boxes, labels, mask = _scene()
    t = TrainTransform(48, scale=(0.2, 1.0), hflip=0.5, interpolation="bilinear", seed=seed)
    out, b, lab, m = t(img, boxes, labels, mask)
    assert out.shape == (48, 48, 3) and m.shape == (48, 48)
    bright = out[..., 0] > 127
    if len(b) == 0:  # the crop missed the box: then it also missed the bright pixels
        assert bright.sum() <= 2 and (m == 1).sum() <= 2
        return
    assert lab.tolist() == [4]
    x0, y0, x1, y1 = b[0]
    assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
    yy, xx = np.mgrid[0:48, 0:48] + 0.5  # pixel centres
    inside = (xx > x0 + 1) & (xx < x1 - 1) & (yy > y0 + 1) & (yy < y1 - 1)
    outside = (xx < x0 - 1) | (xx > x1 + 1) | (yy < y0 - 1) | (yy > y1 + 1)
    assert bright[inside].all() and not bright[outside].any()
    assert (m[inside] == 1).all() and (m[outside] == 0).all()


def test_eval_transform_centre_crop_moves_boxes():
    img, boxes, labels, mask = _scene(h=60, w=80, box=(0, 0, 30, 60))
    out, b, lab, m = EvalTransform(30, crop_pct=1.0, interpolation="bilinear")(img, boxes, labels, mask)
    # the centre 60x60 square starts at x=10: box x 0..30 -> 0..20 of 60 -> 0..10 of 30
    np.testing.assert_allclose(b[0], [0, 0, 10, 30], atol=1e-4)
    assert (m[:, :9] == 1).all() and (m[:, 11:] == 0).all()


def test_box_fully_cropped_out_is_dropped():
    img, _, _, _ = _scene()
    boxes = np.array([[0, 0, 5, 5], [30, 20, 40, 30]], np.float32)
    out, b, lab, _ = EvalTransform(30, crop_pct=0.5)(img, boxes, np.array([1, 2]))
    assert lab.tolist() == [2] and len(b) == 1


def test_normalize_and_mixup_batch_functions():
    import torch

    x = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    y = normalize_batch(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert y.dtype == torch.float32 and torch.allclose(y, torch.full_like(y, 2.0))
    mix = make_mixup(0.8, 1.0, num_classes=10, label_smoothing=0.1)
    xm, target = mix(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert target.shape == (4, 10) and torch.allclose(target.sum(1), torch.ones(4))
    assert make_mixup(0.0, 0.0, 10) is None


# -------------------------------------------------------------------------------------------- Ray pipeline
def _collect(ds):
    batches = list(ds.iter_batches(batch_size=None))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


def test_pipeline_classification_batches(tmp_path, ray_cluster):
    from vitray.data.pipeline import build_datasets

    make_imagefolder(tmp_path / "src", per_class=8, splits=True)
    pack(str(tmp_path / "src"), str(tmp_path / "out"), "imagefolder", progress=False)
    spec, dss = build_datasets(_cfg(tmp_path / "out", train_transforms={"randaugment": "rand-m9-mstd0.5"}), img_size=16)
    assert spec.task == "classification" and set(dss) == {"train", "val"}
    tr, va = _collect(dss["train"]), _collect(dss["val"])
    assert tr["image"].shape == (24, 3, 16, 16) and tr["image"].dtype == np.uint8
    assert tr["label"].dtype == np.int64 and sorted(tr["label"].tolist()) == sorted([0, 1, 2] * 8)
    assert tr["ok"].all() and va["image"].shape == (24, 3, 16, 16)


def test_pipeline_detection_and_segmentation_batches(tmp_path, ray_cluster):
    from vitray.data.pipeline import build_datasets

    make_coco(tmp_path / "coco")
    pack(str(tmp_path / "coco" / "instances.json"), str(tmp_path / "det"), "coco", images=str(tmp_path / "coco" / "images"),
         val_fraction=0.0, progress=False)
    _, dss = build_datasets(_cfg(tmp_path / "det"), img_size=32, max_boxes=5)
    b = _collect(dss["train"])
    assert b["image"].shape == (4, 3, 32, 32) and b["boxes"].shape == (4, 5, 4) and b["boxes"].dtype == np.float32
    assert b["box_labels"].shape == (4, 5) and b["box_labels"].dtype == np.int64
    valid = b["box_labels"] >= 0
    assert valid.any() and (b["boxes"][~valid] == 0).all() and (b["boxes"][valid] <= 32).all()

    make_masks(tmp_path / "seg")
    pack(str(tmp_path / "seg"), str(tmp_path / "segout"), "masks", val_fraction=0.0, progress=False)
    _, dss = build_datasets(_cfg(tmp_path / "segout"), img_size=16)
    b = _collect(dss["train"])
    assert b["image"].shape == (5, 3, 16, 16) and b["mask"].shape == (5, 16, 16) and b["mask"].dtype == np.uint8
    assert set(np.unique(b["mask"]).tolist()) <= {0, 1, 2, 255}


def test_corrupt_bytes_at_read_time_are_flagged_not_fatal(tmp_path, ray_cluster):
    """A shard written by another tool with two bad images: the epoch goes on, the rows come out ok=False."""
    import json

    from vitray.data.formats import Manifest, ShardInfo, sha256_file
    from vitray.data.pipeline import build_datasets

    out = tmp_path / "foreign"
    out.mkdir()
    images = [encode(rgb(i)) for i in range(6)] + [b"\x89PNG broken", b""]
    table = pa.Table.from_pylist([{"id": f"r{i}", "image": d, "width": 24, "height": 20, "split": "train", "label": i % 2}
                                  for i, d in enumerate(images)], schema=schema_for("classification"))
    pq.write_table(table, out / "train-00000.parquet")
    Manifest("classification", ["a", "b"], {"train": 8}, {}, [ShardInfo("train-00000.parquet", "train", 8, 0,
             sha256_file(out / "train-00000.parquet"))]).write(out)
    _, dss = build_datasets(_cfg(out), img_size=16)
    b = _collect(dss["train"])
    assert len(b["ok"]) == 8 and int((~b["ok"]).sum()) == 2
    assert json.loads((out / "manifest.json").read_text())["task"] == "classification"


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "imagefolder"])
def test_train_from_raw_formats_without_packing(fmt, tmp_path, ray_cluster):
    from vitray.data.pipeline import build_datasets

    if fmt == "webdataset":
        make_webdataset(tmp_path / "raw")
        expected = {"train": 5, "val": 5}
    elif fmt == "parquet":
        (tmp_path / "raw").mkdir()
        rows = [{"image": encode(rgb(i)), "label": i % 3} for i in range(9)]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "raw" / "train-0.parquet")
        expected = {"train": 9}
    else:
        make_imagefolder(tmp_path / "raw", per_class=4, splits=True)
        expected = {"train": 12, "val": 12}
    spec, dss = build_datasets(_cfg(tmp_path / "raw", format=fmt), img_size=16)
    for split, n in expected.items():
        b = _collect(dss[split])
        assert b["image"].shape == (n, 3, 16, 16) and b["ok"].all() and b["label"].dtype == np.int64
