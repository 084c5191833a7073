"""Packing: every source format round-trips byte-identically with its labels, boxes or masks; bad input is skipped
and listed; splits are deterministic; inspect --verify catches a modified shard."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from imagegen import encode, make_coco, make_imagefolder, make_masks, make_webdataset, rgb
from vitray.data import Manifest, decode_mask, split_of
from vitray.data.pack import pack


def read_rows(out: Path) -> dict[str, dict]:
    m = Manifest.read(out)
    rows = {}
    for s in m.shards:
        for r in pq.read_table(out / s.file).to_pylist():
            assert r["id"] not in rows, f"duplicate id {r['id']}"
            assert r["split"] == s.split
            rows[r["id"]] = r
    assert len(rows) == sum(m.counts.values())
    return rows


def test_imagefolder_round_trip_with_splits(tmp_path):
    written = make_imagefolder(tmp_path / "src", splits=True)
    m = pack(str(tmp_path / "src"), str(tmp_path / "out"), "imagefolder", shard_rows=7, progress=False)
    rows = read_rows(tmp_path / "out")
    assert m.class_names == ["cat", "dog", "eel"] and m.counts == {"train": 18, "val": 18}
    assert len(m.shards) == 6  # 18 rows per split, 7 rows per shard
    for rel, data in written.items():
        r = rows[rel]
        assert r["image"] == data  # byte-identical
        assert r["label"] == m.class_names.index(rel.split("/")[1])
        assert r["split"] == rel.split("/")[0]
        assert (r["width"], r["height"]) == (24, 20)


def test_imagefolder_hash_split_is_deterministic(tmp_path):
    make_imagefolder(tmp_path / "src", per_class=40, fmt="JPEG")
    a = pack(str(tmp_path / "src"), str(tmp_path / "a"), "imagefolder", val_fraction=0.25, progress=False)
    b = pack(str(tmp_path / "src"), str(tmp_path / "b"), "imagefolder", val_fraction=0.25, progress=False)
    assert a.counts == b.counts and 10 < a.counts["val"] < 50
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]  # same bytes, same order
    for rid, r in read_rows(tmp_path / "a").items():
        assert r["split"] == split_of(rid, 0.25)


def test_split_of_is_a_pure_function_of_the_id():
    # reference computed independently: first 8 bytes of sha256 as a big-endian fraction of 2**64
    for sid in ("cat/cat_000.png", "digits-0001", "x"):
        h = int(hashlib.sha256(sid.encode()).hexdigest()[:16], 16) / 2**64
        assert split_of(sid, 0.3) == ("val" if h < 0.3 else "train")
    assert split_of("cat/cat_000.png", 0.0) == "train"


def test_coco_detection_round_trip(tmp_path):
    coco = make_coco(tmp_path / "coco")
    m = pack(str(tmp_path / "coco" / "instances.json"), str(tmp_path / "out"), "coco", images=str(tmp_path / "coco" / "images"),
             val_fraction=0.0, progress=False)
    assert m.task == "detection" and m.class_names == ["person", "boat"]  # sorted by category id (3, 7)
    rows = read_rows(tmp_path / "out")
    for im in coco["images"]:
        r = rows[im["file_name"]]
        assert r["image"] == (tmp_path / "coco" / "images" / im["file_name"]).read_bytes()
        i = int(im["file_name"][2])
        # the rectangle is category 3 -> "person" (0), the RLE object "boat" (1); the crowd box is kept, flagged
        assert r["boxes"] == [[5 + i, 4, 20 + i, 16], [30, 20, 35, 25], [0, 26, 4, 30]]
        assert r["box_labels"] == [0, 1, 1] and r["box_crowd"] == [False, False, True]
    n = len(coco["images"])
    assert m.class_counts["train"] == {"person": n, "boat": n}  # crowd boxes are not counted as objects


def test_coco_segmentation_rasterises_polygons_and_rle(tmp_path):
    make_coco(tmp_path / "coco")
    m = pack(str(tmp_path / "coco" / "instances.json"), str(tmp_path / "out"), "coco", task="segmentation",
             images=str(tmp_path / "coco" / "images"), val_fraction=0.0, progress=False)
    assert m.task == "segmentation" and m.class_names == ["background", "person", "boat"]
    mask = decode_mask(read_rows(tmp_path / "out")["im0.png"]["mask"])
    assert mask.shape == (30, 40)
    assert (mask[5:16, 6:20] == 1).all()  # polygon interior -> person
    assert (mask[20:25, 30:35] == 2).all() and (mask == 2).sum() == 25  # RLE -> boat, exactly its 25 pixels
    assert (mask[27:30, 0:4] == 255).all()  # crowd -> ignore
    assert mask[0, 39] == 0 and mask[28, 20] == 0


def test_masks_round_trip(tmp_path):
    src = make_masks(tmp_path / "seg")
    m = pack(str(tmp_path / "seg"), str(tmp_path / "out"), "masks", val_fraction=0.0, progress=False)
    assert m.task == "segmentation" and m.class_names == ["background", "road", "car"]
    rows = read_rows(tmp_path / "out")
    for rid, (img, mask) in src.items():
        assert rows[rid]["image"] == img and rows[rid]["mask"] == mask


def test_webdataset_round_trip_keeps_tar_splits(tmp_path):
    src = make_webdataset(tmp_path / "wds")
    m = pack(str(tmp_path / "wds"), str(tmp_path / "out"), "webdataset", progress=False)
    assert m.counts == {"train": 5, "val": 5} and m.class_names == ["0", "1", "2"]
    rows = read_rows(tmp_path / "out")
    for rid, (data, label) in src.items():
        assert rows[rid]["image"] == data and rows[rid]["label"] == label


def test_sklearn_digits(tmp_path):
    m = pack("-", str(tmp_path / "out"), "sklearn-digits", val_fraction=0.1, progress=False)
    from sklearn.datasets import load_digits

    d = load_digits()
    rows = read_rows(tmp_path / "out")
    assert len(rows) == 1797 and m.class_names == [str(i) for i in range(10)]
    r = rows["digits-0042"]
    px = np.asarray(Image.open(io.BytesIO(r["image"])))
    np.testing.assert_array_equal(px, np.rint(d.images[42] * 255 / 16).astype(np.uint8))
    assert r["label"] == d.target[42]


def test_corrupt_files_are_skipped_and_listed(tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src, classes=("a", "b"), per_class=20)  # 40 good images
    good = encode(rgb(7, (200, 150)), "JPEG")
    bad = {
        "a/zero.png": b"",
        "a/notes.txt": b"hello, not an image",
        "b/truncated.jpg": good[: int(len(good) * 0.6)],  # header intact, scan data cut
    }
    for rel, data in bad.items():
        (src / rel).write_bytes(data)
    m = pack(str(src), str(tmp_path / "out"), "imagefolder", progress=False)
    assert sum(m.counts.values()) == 40
    listed = {Path(s["path"]).relative_to(src).as_posix(): s["reason"] for s in m.skipped}
    assert set(listed) == set(bad)
    assert "empty" in listed["a/zero.png"] and "not an image" in listed["a/notes.txt"]
    assert "truncated" in listed["b/truncated.jpg"]


def test_decompression_bomb_refused(tmp_path):
    src = tmp_path / "src"
    make_imagefolder(src, classes=("a",), per_class=3)
    bomb = Image.new("L", (12_000, 6_000))  # 72 Mpx of zeros: a 70 kB PNG
    (src / "a" / "bomb.png").write_bytes(encode(bomb, optimize=True))
    m = pack(str(src), str(tmp_path / "out"), "imagefolder", progress=False)  # default cap: 64 Mpx
    assert sum(m.counts.values()) == 3
    assert len(m.skipped) == 1 and "too many pixels" in m.skipped[0]["reason"] and "12000x6000" in m.skipped[0]["reason"]


def test_non_empty_out_needs_overwrite(tmp_path, cli):
    make_imagefolder(tmp_path / "src")
    args = ["data", "pack", str(tmp_path / "src"), str(tmp_path / "out"), "--format", "imagefolder"]
    assert cli(*args).returncode == 0
    res = cli(*args)
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert cli(*args, "--overwrite").returncode == 0
    assert len(list((tmp_path / "out").glob("*.parquet"))) == len(Manifest.read(tmp_path / "out").shards)


@pytest.mark.parametrize("case", ["empty_source", "unknown_format", "missing_annotations", "missing_source"])
def test_bad_sources_exit_2(case, tmp_path, cli):
    (tmp_path / "empty").mkdir()
    args = {
        "empty_source": [str(tmp_path / "empty"), "--format", "imagefolder"],
        "unknown_format": [str(tmp_path / "empty"), "--format", "tiff-stack"],
        "missing_annotations": [str(tmp_path / "nope.json"), "--format", "coco"],
        "missing_source": [str(tmp_path / "nowhere"), "--format", "masks"],
    }[case]
    res = cli("data", "pack", args[0], str(tmp_path / "out"), *args[1:])
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and res.stderr.startswith("vitray: error:")


def test_inspect_verify_detects_modified_shard(tmp_path, cli):
    make_imagefolder(tmp_path / "src", per_class=10)
    out = tmp_path / "out"
    assert cli("data", "pack", str(tmp_path / "src"), str(out), "--format", "imagefolder", "--shard-rows", "8").returncode == 0
    res = cli("data", "inspect", str(out), "--verify")
    assert res.returncode == 0 and "every shard matches" in res.stdout and "cat" in res.stdout
    shard = sorted(out.glob("train-*.parquet"))[0]
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside the data pages
    shard.write_bytes(bytes(blob))
    res = cli("data", "inspect", str(out), "--verify")
    assert res.returncode == 1 and shard.name in res.stdout and "sha256" in res.stdout


def test_manifest_lists_shards_with_hashes(tmp_path):
    make_imagefolder(tmp_path / "src")
    pack(str(tmp_path / "src"), str(tmp_path / "out"), "imagefolder", progress=False)
    data = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert data["format_version"] == 2 and data["task"] == "classification"
    assert {"file", "rows", "sha256", "bytes", "split"} <= set(data["shards"][0])
