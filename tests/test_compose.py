"""`vitray data compose`: seeded scenes whose masks, COCO segmentations and COCO boxes all agree, pixel for pixel."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vitray.data import decode_mask
from vitray.data.compose import MIN_VISIBLE, ComposeError, _scene, compose
from vitray.data.pack import pack
from vitray.data.sources import _rasterise


def rows(shards: Path) -> dict[str, dict]:
    return {r["id"]: r for f in sorted(shards.glob("*.parquet")) for r in pq.read_table(f).to_pylist()}


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("compose") / "scenes"
    return out, compose("-", str(out), source="sklearn-digits", classes="0,1,2", n=40, seed=3)


def test_layout_files_and_determinism(composed, tmp_path):
    out, summary = composed
    assert summary.counts == {"train": 32, "val": 8} and summary.classes == ["0", "1", "2"]
    assert (out / "classes.txt").read_text().split() == ["background", "0", "1", "2"]
    coco = json.loads((out / "annotations.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["0", "1", "2"] and len(coco["images"]) == 40
    assert len(coco["annotations"]) == summary.items >= 40
    for im in coco["images"]:
        img = Image.open(out / "images" / im["file_name"])
        mask = np.asarray(Image.open(out / "masks" / im["file_name"]))
        assert img.mode == "RGB" and img.size == (64, 64) and mask.shape == (64, 64)
        assert set(np.unique(mask)) <= {0, 1, 2, 3} and mask.any()
    again = compose("-", str(tmp_path / "again"), source="sklearn-digits", classes="0,1,2", n=40, seed=3, workers=1)
    assert again.counts == summary.counts and tree(tmp_path / "again") == tree(out)
    other = compose("-", str(tmp_path / "other"), source="sklearn-digits", classes="0,1,2", n=40, seed=4)
    assert tree(tmp_path / "other") != tree(out)


def test_masks_coco_segmentation_and_boxes_agree(composed, tmp_path):
    out, _ = composed
    pack(str(out), str(tmp_path / "m"), "masks", val_fraction=0.2, progress=False)
    pack(str(out / "annotations.json"), str(tmp_path / "c"), "coco", task="segmentation", images=str(out / "images"),
         progress=False)
    pack(str(out / "annotations.json"), str(tmp_path / "d"), "coco", task="detection", images=str(out / "images"),
         progress=False)
    by_mask, by_coco, by_box = rows(tmp_path / "m"), rows(tmp_path / "c"), rows(tmp_path / "d")
    assert set(by_mask) == set(by_coco) == set(by_box) and len(by_mask) == 40
    assert {r["split"] for r in by_mask.values()} == {"train", "val"}
    for rid, r in by_mask.items():
        assert r["split"] == by_coco[rid]["split"] == rid.split("/")[0]
        np.testing.assert_array_equal(decode_mask(r["mask"]), decode_mask(by_coco[rid]["mask"]), err_msg=rid)

    coco = json.loads((out / "annotations.json").read_text())
    anns: dict[int, list] = {}
    for a in coco["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    for im in coco["images"]:
        mask = np.asarray(Image.open(out / "masks" / im["file_name"]))
        inst = [_rasterise(a["segmentation"], 64, 64).astype(bool) for a in anns[im["id"]]]
        assert sum(m.astype(int) for m in inst).max() == 1  # visible parts never overlap
        for a, m in zip(anns[im["id"]], inst):
            assert a["area"] == m.sum() and a["iscrowd"] == 0 and (mask[m] == a["category_id"]).all()
        assert ((mask > 0) == np.any(inst, axis=0)).all()
        det = by_box[im["file_name"]]
        assert sorted(det["box_labels"]) == sorted(a["category_id"] - 1 for a in anns[im["id"]])
        for box, label in zip(det["boxes"], det["box_labels"]):  # each box tightly encloses one item's pixels
            x0, y0, x1, y1 = (int(v) for v in box)
            assert any(m[y0:y1, x0:x1].sum() == m.sum() and m[y0, x0:x1].any() and m[y1 - 1, x0:x1].any()
                       and m[y0:y1, x0].any() and m[y0:y1, x1 - 1].any()
                       for a, m in zip(anns[im["id"]], inst) if a["category_id"] == label + 1)


def test_overlap_is_capped():
    shapes = np.ones((20, 20), dtype=bool)
    for seed in range(50):
        inst, items = _scene(np.random.default_rng(seed), 32, 5, lambda c, j, side: shapes[:side, :side],
                             [np.arange(1), np.arange(1)])
        seen = np.bincount(inst.ravel(), minlength=len(items) + 1)
        assert items and all(seen[j + 1] >= MIN_VISIBLE * full for j, (_, full, _) in enumerate(items))


def test_held_out_items_keep_val_items_out_of_training(composed, tmp_path):
    """--held-out-items: no source image pasted into a val scene appears in any train scene (without it, they mix);
    the scenes' layouts are otherwise drawn the same way."""
    def sources(folder: Path) -> dict[str, set]:
        coco = json.loads((folder / "annotations.json").read_text())
        split = {im["id"]: im["file_name"].split("/")[0] for im in coco["images"]}
        out: dict[str, set] = {"train": set(), "val": set()}
        for a in coco["annotations"]:
            out[split[a["image_id"]]].add((a["category_id"], a["vitray_source"]))
        return out

    kw = dict(source="sklearn-digits", classes="0,1,2", n=400, size=32, seed=3)
    mixed = compose("-", str(tmp_path / "mixed"), **kw)
    assert sources(tmp_path / "mixed")["train"] & sources(tmp_path / "mixed")["val"]
    r = compose("-", str(tmp_path / "held"), **kw, held_out_items=True)
    held = sources(tmp_path / "held")
    assert r.counts == mixed.counts and held["val"] and not held["train"] & held["val"]


def test_imagefolder_source(tmp_path):
    src = tmp_path / "src"
    for k, cls in enumerate(("cross", "ring")):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            a = np.full((12, 12), 255, np.uint8)  # dark ink on a light page: inverted by compose
            if k == 0:
                a[5:7, 1:11] = a[1:11, 5:7] = 0
            else:
                a[2:10, 2:10], a[4:8, 4:8] = 0, 255
            Image.fromarray(a, "L").save(src / cls / f"{i}.png")
    r = compose(str(src), str(tmp_path / "out"), n=10, size=32, classes=["ring"])
    assert r.classes == ["ring"] and sum(r.counts.values()) == 10
    masks = [np.asarray(Image.open(p)) for p in (tmp_path / "out" / "masks").rglob("*.png")]
    assert len(masks) == 10 and all(set(np.unique(m)) == {0, 1} for m in masks)


def test_refusals(composed, tmp_path):
    out, _ = composed
    with pytest.raises(ComposeError, match="not empty"):
        compose("-", str(out), source="sklearn-digits", n=5)
    with pytest.raises(ComposeError, match="--classes"):
        compose("-", str(tmp_path / "x"), source="sklearn-digits", classes="0,42")
    with pytest.raises(ComposeError, match="--n"):
        compose("-", str(tmp_path / "x"), source="sklearn-digits", n=0)


def test_cli(cli, tmp_path):
    out = tmp_path / "scenes"
    r = cli("data", "compose", "-", str(out), "--from", "sklearn-digits", "--n", "20")
    assert r.returncode == 0, r.stderr
    assert "composed 20 scenes" in r.stdout and len(list((out / "images").rglob("*.png"))) == 20
    bad = cli("data", "compose", "-", str(tmp_path / "bad"), "--from", "sklearn-digits", "--classes", "42")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--classes" in bad.stderr


def test_captions_say_what_how_many_where_and_how_big(tmp_path):
    from vitray.data.compose import caption

    assert caption([("7", [0, 0, 14, 14])], 32) == "a large 7 at the top left"
    assert caption([("8", [12, 12, 8, 8])], 32) == "a small 8 in the centre"
    assert caption([("3", [22, 10, 12, 12]), ("apple", [10, 24, 12, 8])], 32) == \
        "two items: a 3 at the right and an apple at the bottom"
    r = compose("-", str(tmp_path / "c"), source="sklearn-digits", n=30, size=32, max_items=2, seed=1, captions=True)
    caps = json.loads((tmp_path / "c" / "captions.json").read_text())
    coco = json.loads((tmp_path / "c" / "annotations.json").read_text())
    assert r.paths["captions.json"] and len(caps["annotations"]) == 30 and caps["images"] == coco["images"]
    for rec in caps["annotations"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == rec["image_id"]]
        names = [str(a["category_id"] - 1) for a in anns]
        assert rec["caption"] == caption([(n, a["bbox"]) for n, a in zip(names, anns)], 32)
        assert all(n in rec["caption"] for n in names)
        assert rec["caption"].startswith("two items") == (len(anns) == 2)
    plain = compose("-", str(tmp_path / "plain"), source="sklearn-digits", n=3, size=32, seed=1)
    assert "captions.json" not in plain.paths and not (tmp_path / "plain" / "captions.json").exists()
