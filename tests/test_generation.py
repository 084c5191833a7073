"""Generation as a task: composed scenes with captions packed as image-caption pairs, captions through the pipeline
as bytes, a classification pack's rows captioned with their class, and a DiT trained on Ray Train + DeepSpeed whose
export samples deterministically."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vitray.tasks.generation.data import CAPTION_BYTES, CODEC, decode_captions, encode_caption
from vitray.tasks.generation.judge import Moments, frechet_distance, prompted_class


@pytest.fixture(scope="module")
def caption_shards(tmp_path_factory):
    from vitray.data.compose import compose
    from vitray.data.pack import pack

    root = tmp_path_factory.mktemp("captioned")
    compose("-", str(root / "scenes"), source="sklearn-digits", n=160, size=32, max_items=2, seed=2, captions=True)
    m = pack(str(root / "scenes" / "captions.json"), str(root / "shards"), "coco", task="generation",
             images=str(root / "scenes" / "images"), progress=False)
    return root, m


def _val_captions(root):
    import pyarrow.parquet as pq

    return pq.read_table(sorted((root / "shards").glob("val-*.parquet"))).column("caption").to_pylist()


def test_prompted_class_and_the_frechet_distance():
    names = [str(i) for i in range(10)] + ["apple"]
    assert [prompted_class(c, names) for c in ("a 7", "an apple", "a large 7 at the top left", "a small 0 in the "
                                               "centre", "two items: a 3 in the centre and a 4 at the top", "a pear",
                                               "a 12")] == [7, 10, 7, 0, None, None, None]
    g = np.random.default_rng(0)
    a, b = g.normal(size=(4000, 3)), g.normal(size=(4000, 3)) * 2 + 1
    stats = []
    for x in (a, b):
        mom = Moments()
        mom.add(torch.from_numpy(x[:2000]))
        mom.add(torch.from_numpy(x[2000:]))
        stats.append(Moments.stats(mom.packed(3, "cpu"), 3)[1:])
    np.testing.assert_allclose(stats[0][1], np.cov(a.T), rtol=1e-9)
    # N(0, I) vs N(1, 4I) in 3-D: |mu|^2 = 3, trace term 3 (1 + 4 - 2 * 2) = 3
    assert abs(frechet_distance(*stats[0], *stats[1]) - 6.0) < 0.3
    assert abs(frechet_distance(*stats[0], *stats[0])) < 1e-6


def test_composed_captions_pack_as_image_caption_pairs(caption_shards):
    import pyarrow.parquet as pq

    root, m = caption_shards
    assert m.task == "generation" and m.counts == {"train": 128, "val": 32} and not m.skipped
    table = pq.read_table(sorted((root / "shards").glob("*.parquet")))
    caps = json.loads((root / "scenes" / "captions.json").read_text())
    by_file = {im["file_name"]: im["id"] for im in caps["images"]}
    want = {a["image_id"]: a["caption"] for a in caps["annotations"]}
    got = dict(zip(table.column("id").to_pylist(), table.column("caption").to_pylist()))
    assert len(got) == 160 and all(got[f] == want[by_file[f]] for f in got)


def test_captions_travel_as_bytes_and_unlabelled_rows_say_so():
    texts = ["a large 7 at the top left", "ünïcödé " * 40, None]
    out = CODEC.begin({"caption": texts, "image": [b""] * 3}, 3, 32, 10)
    assert out["caption"].shape == (3, CAPTION_BYTES) and out["caption"].dtype == np.uint8
    back = decode_captions(torch.from_numpy(out["caption"]))
    assert back[0] == texts[0] and texts[1].startswith(back[1]) and len(back[1].encode()) <= CAPTION_BYTES
    assert back[2] == "" and (out["label"] == -1).all()
    assert decode_captions(encode_caption("a 3")[None]) == ["a 3"]


def test_a_classification_pack_is_captioned_with_its_class_names():
    from vitray.config import parse_config
    from vitray.tasks.generation.train import GenerationTask

    cfg = parse_config({"train": {"task": "generation"}})
    task = GenerationTask(cfg, [str(i) for i in range(10)] + ["apple"])
    batch = {"caption": torch.from_numpy(np.stack([encode_caption("a small 2 at the top"), encode_caption("")] * 2)),
             "label": torch.tensor([-1, 8, -1, 10])}
    assert task.captions(batch) == ["a small 2 at the top", "an 8", "a small 2 at the top", "an apple"]
    by_label = GenerationTask(parse_config({"train": {"task": "generation"}, "generation": {"condition": "label"}}),
                              [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="no label"):
        by_label.condition({"label": torch.tensor([3, -1])})


def test_a_dit_trains_on_ray_with_deepspeed_judged_by_a_classifier_and_its_export_samples_deterministically(
        ray_cluster, caption_shards, digits, tmp_path):
    """2 workers, ZeRO-2, 2 epochs on captioned scenes: val/loss (fixed noise) and the EMA's, the judge's metrics
    on the one-item captions, the sample grid in MLflow, and an export that builds the DiT back and samples the
    same images for the same seed."""
    from digits_classifier import train_digits_classifier
    from vitray.config import parse_config
    from vitray.models.export import EXPORT_META, read_export_meta
    from vitray.models.text_encoder import SentenceEncoder
    from vitray.models.flow import sample
    from vitray.tasks import get_task
    from vitray.tracking import default_tracking_uri
    from vitray.tracking.uris import client_for
    from vitray.train import run_training

    root, _ = caption_shards
    judge = tmp_path / "judge"
    train_digits_classifier(digits, judge, epochs=2)
    one_item_val = sum(1 for c in _val_captions(root) if prompted_class(c, [str(i) for i in range(10)]) is not None)
    cfg = parse_config({
        "model": {"name": "vit_pico_patch4_32", "img_size": 32},
        "data": {"path": str(root / "shards"), "batch_size": 32},
        "train": {"task": "generation", "epochs": 2, "lr": 2e-3, "warmup_epochs": 0.5, "log_every_steps": 1},
        "generation": {"sample_steps": 4, "judge": str(judge)},
        "deepspeed": {"zero_stage": 2},
        "cluster": {"num_workers": 2, "storage_path": str(tmp_path / "runs"), "run_name": "gen"},
        "tracking": {"experiment": "gen", "flush_interval_s": 1.0},
    })
    result = run_training(cfg)
    assert result.metrics["step"] == 4
    client = client_for(default_tracking_uri())
    history = client.get_metric_history(result.mlflow_run_id, "train/loss")
    assert len(history) == 4 and all(np.isfinite(h.value) for h in history)
    run = client.get_run(result.mlflow_run_id)
    m = run.data.metrics
    assert {"val/loss", "val/loss_ema", "val/cond_acc", "val/fd", "val/judge_real_acc"} <= set(m)
    assert m["val/judged_samples"] == one_item_val > 5  # every one-item val caption, across both workers
    assert 0 <= m["val/cond_acc"] <= 1 and 0 <= m["val/judge_real_acc"] <= 1 and m["val/fd"] > 0
    assert "pictures/val_samples.png" in {a.path for a in client.list_artifacts(result.mlflow_run_id, "pictures")}

    export = Path(result.export_dir)
    meta = read_export_meta(export)
    assert (meta["task"], meta["model"]["condition"], meta["model"]["cond_dim"]) == ("generation", "caption", 384)
    model = get_task("generation", "model").load("model").build(meta["model"], checkpoint=str(export)).eval()
    encoder = SentenceEncoder.from_package(meta["model"]["text_encoder"])
    cond = encoder.encode(["a large 7 at the top left", "a small 0 at the bottom"])

    def draw(seed):
        return sample(model, cond, (3, 32, 32), steps=3, guidance=2.0, generator=torch.Generator().manual_seed(seed))

    a = draw(5)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, draw(5)) and not torch.equal(a, draw(6))
    assert (export / EXPORT_META).is_file()


def _random_export(folder, img_size: int = 16, steps: int = 3):
    """A generator export with random weights (every layer non-zero: a fresh DiT would draw the same image for any
    prompt): what `vitray generate`, the Generator and serving read, without training one."""
    from vitray.models.export import save_export
    from vitray.models.dit import DiT, DiTArch

    arch = dict(img_size=img_size, in_chans=3, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0,
                num_classes=0, cond_dim=384)
    torch.manual_seed(0)
    dit = DiT(DiTArch(**arch))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_export(folder, dit.state_dict(), task="generation", class_names=[],
                model={"name": "vit_pico_patch4_32", **arch, "condition": "caption",
                       "text_encoder": "all-MiniLM-L6-v2", "sample_steps": steps, "guidance": 2.0},
                preprocessing={"img_size": img_size, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                               "interpolation": "bicubic"})
    return folder


@pytest.fixture(scope="module")
def random_generator(tmp_path_factory):
    return _random_export(tmp_path_factory.mktemp("gen-export") / "export")


def test_an_image_depends_on_its_prompt_and_seed_only_never_on_its_batch(random_generator):
    from vitray.tasks.generation.generator import GenerateError, Generator, png_bytes

    gen = Generator(random_generator, width=4)
    alone = gen.generate(["a 7 at the top left"], [11])
    crowd = gen.generate(["a 3", "a 7 at the top left", "two items: a 1 and a 2", "a 9", "a 5", "a 7 at the top left"],
                         [1, 11, 2, 3, 4, 12])
    assert alone.shape == (1, 16, 16, 3) and alone.dtype == np.uint8
    assert png_bytes(alone[0]) == png_bytes(crowd[1])  # the same bytes in another batch, at another position
    assert not np.array_equal(crowd[1], crowd[5])  # another seed
    assert not np.array_equal(gen.generate(["a 3"], [11]), alone)  # another prompt
    blind = [gen.generate([p], [11], guidance=0.0) for p in ("a 3", "a 7 at the top left")]
    assert np.array_equal(*blind)  # guidance 0: the prompt is ignored
    for bad, match in ((dict(prompts=[" "]), "prompt: empty"), (dict(steps=0), "steps: 0"),
                       (dict(guidance=25.0), "guidance: 25"), (dict(prompts=["x" * 600]), "at most 500")):
        with pytest.raises(GenerateError, match=match):
            gen.generate(bad.get("prompts", ["a 3"]), [0] * len(bad.get("prompts", ["a 3"])),
                         steps=bad.get("steps"), guidance=bad.get("guidance"))


def test_vitray_generate_writes_pngs_and_refuses_what_it_cannot_do(cli, random_generator, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    res = cli("generate", "a large 7 at the top left", "--model", str(random_generator), "--n", "3", "--seed", "5",
              "-o", str(out), timeout=120)
    assert res.returncode == 0, res.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [f"a-large-7-at-the-top-left-seed{s}.png" for s in (5, 6, 7)]
    assert Image.open(files[0]).size == (16, 16)
    records = [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]
    assert [(r["seed"], r["steps"], r["guidance"]) for r in records] == [(5, 3, 2.0), (6, 3, 2.0), (7, 3, 2.0)]
    again = cli("generate", "a large 7 at the top left", "--model", str(random_generator), "--n", "1", "--seed", "6",
                "-o", str(tmp_path / "again"), timeout=120)
    assert again.returncode == 0 and (tmp_path / "again" / files[1].name).read_bytes() == files[1].read_bytes()
    for args, message in ((["--steps", "0"], "steps: 0"), (["--guidance", "-1"], "guidance: -1"),
                          (["--n", "0"], "--n 0")):
        res = cli("generate", "a 7", "--model", str(random_generator), "-o", str(tmp_path / "x"), *args, timeout=120)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr


@pytest.mark.slow
def test_post_v1_generate_batches_concurrent_requests_and_answers_bad_ones_with_4xx(ray_cluster, random_generator,
                                                                                   tmp_path):
    """The generator registered in MLflow (its pyfunc: prompts in, PNGs out), served by Ray Serve over real HTTP:
    48 concurrent requests all answered and batched, each PNG the same bytes as offline for its seed; bad JSON, an
    empty prompt, out-of-range steps or guidance and unknown keys get 400 JSON, and the server keeps serving."""
    import concurrent.futures as cf
    import socket

    import mlflow
    import pandas as pd
    import requests
    from ray import serve

    from vitray.config import TrackingConfig, parse_config
    from vitray.serve import app
    from vitray.tasks.generation.generator import Generator, png_bytes
    from vitray.tracking.registry import log_and_register
    from vitray.tracking.uris import tracking_scope

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reg = log_and_register(str(random_generator), TrackingConfig(uri=uri, registered_model="gen"))
    assert (reg.name, reg.alias) == ("gen", "champion")
    offline = Generator(random_generator)
    prompts = [f"a {i % 10} at the top left" if i % 3 else f"two items: a {i % 10} and a {(i + 1) % 10}"
               for i in range(48)]
    expected = [png_bytes(im) for im in offline.generate(prompts, list(range(100, 148)))]
    with tracking_scope(uri):
        pyfunc = mlflow.pyfunc.load_model("models:/gen@champion")
    frame = pyfunc.predict(pd.DataFrame({"prompt": prompts[:3], "seed": [100, 101, 102]}))
    assert list(frame["image"]) == expected[:3] and list(frame["seed"]) == [100, 101, 102]
    from conftest import run_cli  # `vitray generate` without --model: the one registered generator's champion

    res = run_cli("generate", prompts[0], "--seed", "100", "--n", "1", "-o", str(tmp_path / "cli"), "--tracking-uri", uri,
                  timeout=120)
    assert res.returncode == 0, res.stderr
    assert next((tmp_path / "cli").glob("*.png")).read_bytes() == expected[0]
    res = run_cli("generate", "a 3", "-o", str(tmp_path / "none"), "--tracking-uri", f"sqlite:///{tmp_path}/empty.db",
                  timeout=120)
    assert res.returncode == 2 and "no registered generator" in res.stderr, res.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = parse_config({"tracking": {"uri": uri}, "serve": {
        "port": port, "models": [{"name": "gen", "uri": "models:/gen@champion"}], "max_batch_size": 16,
        "batch_wait_timeout_s": 0.2, "cpus_per_replica": 1}})
    app.deploy(cfg)
    url = f"http://127.0.0.1:{port}/v1/generate"
    try:
        def one(i):
            r = requests.post(url, json={"prompt": prompts[i], "seed": 100 + i}, timeout=120)
            return r.status_code, r.headers, r.content

        with cf.ThreadPoolExecutor(48) as pool:
            results = list(pool.map(one, range(48)))
        assert [r[0] for r in results] == [200] * 48
        assert all(h["content-type"] == "image/png" and h["x-vitray-seed"] == str(100 + i)
                   and h["x-vitray-model-version"] == reg.version for i, (_, h, _) in enumerate(results))
        assert [body for _, _, body in results] == expected  # byte for byte, however the requests were batched
        sizes = [int(h["x-vitray-batch-size"]) for _, h, _ in results]
        assert max(sizes) > 1, f"batches did not form: {sorted(sizes)}"
        drawn = requests.post(url, json={"prompt": "a 3", "steps": 2, "guidance": 1.5}, timeout=60)
        assert drawn.status_code == 200 and int(drawn.headers["x-vitray-seed"]) >= 0
        again = requests.post(url, json={"prompt": "a 3", "steps": 2, "guidance": 1.5,
                                         "seed": int(drawn.headers["x-vitray-seed"])}, timeout=60)
        assert again.content == drawn.content  # a drawn seed comes back in the header: the image can be redrawn
        for body, message in ((b"{not json", "not JSON"), (b'{"prompt": ""}', "prompt"),
                              (b'{"prompt": "a 3", "steps": 0}', "steps"),
                              (b'{"prompt": "a 3", "guidance": 99}', "guidance"),
                              (b'{"prompt": "a 3", "colour": "red"}', "colour"), (b'["a 3"]', "")):
            r = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)
            assert r.status_code == 400 and message in r.json()["error"], (body, r.status_code, r.text)
        assert requests.post(url, json={"prompt": "a 3"}, params={"model": "nope"}, timeout=60).status_code == 404
        assert requests.post(url, json={"prompt": prompts[0], "seed": 100}, timeout=60).content == expected[0]
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_vitray_score_draws_a_prompt_file_exactly_once_across_a_kill(tmp_path):
    """`vitray score` with a generator: Parquet and CSV prompt files -> one PNG per row in units written whole;
    SIGKILLed once a unit is on disk, the rerun draws only the rest: every id once, each image the bytes
    `Generator` draws offline for its prompt and seed, an empty prompt an error row."""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from killing import run_and_kill_midway
    from vitray.tasks.generation.generator import Generator, png_bytes

    model = _random_export(tmp_path / "slow-export", img_size=32, steps=40)  # enough work to kill the job midway
    src = tmp_path / "prompts"
    src.mkdir()
    expected = {}
    for f in range(5):
        prompts = [f"a {(f + i) % 10} at the {'top' if i % 2 else 'bottom'}" for i in range(30)]
        if f == 2:
            prompts[7] = ""
        ids = [f"f{f}-{i}" for i in range(30)]
        pq.write_table(pa.table({"id": ids, "prompt": prompts, "seed": [1000 * f + i for i in range(30)]}),
                       src / f"batch-{f}.parquet")
        expected.update({k: (p, 1000 * f + i) for i, (k, p) in enumerate(zip(ids, prompts))})
    (src / "more.csv").write_text("prompt\n" + "".join(f"a large {i} in the centre\n" for i in range(12)))
    expected.update({f"more.csv:{i}": (f"a large {i} in the centre", i) for i in range(12)})

    out = tmp_path / "drawn"
    cmd = [sys.executable, "-m", "vitray.cli", "score", "--model", str(model), "--input", str(src),
           "--output", str(out), "--batch-size", "16"]
    env = {**os.environ, "VITRAY_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "ignore"}
    done_before = run_and_kill_midway(cmd, env, tmp_path / "first.log", lambda: list(out.glob("part-*.parquet")), 6,
                                      timeout=240)
    assert len(done_before) in range(1, 6)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["units"] == 6 and summary["units_skipped"] == len(done_before) and summary["error_rows"] == 1
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(expected) == 162 and set(ids) == set(expected)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["f2-7"]["error"] == "prompt: empty" and rows["f2-7"]["image"] is None
    gen = Generator(model, width=16)
    check = ["f0-0", "f2-8", "f4-29", "more.csv:3"]
    drawn = gen.generate([expected[k][0] for k in check], [expected[k][1] for k in check])
    for k, im in zip(check, drawn):
        assert rows[k]["seed"] == expected[k][1] and rows[k]["image"] == png_bytes(im), k
    assert not list(out.glob(".part-*"))


def test_the_chain_labels_generated_images_and_finds_their_nearest_real_images(ray_cluster, random_generator,
                                                                               digits, cli, tmp_path):
    """caption -> image (generator) -> label (classifier) -> look-alikes (the `vitray embed` catalogue of the
    digits, built with that classifier): labels are the classifier's argmax, look-alikes the catalogue rows of
    highest cosine similarity to the image's own embedding, with their images read back from the shards."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from vitray.batch import score
    from vitray.chain import Catalogue, run_chain
    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.predict import Predictor

    torch.manual_seed(1)
    classifier = save_export(tmp_path / "cls", create_model("vit_pico_patch4_32", num_classes=10).state_dict(),
                             model={"name": "vit_pico_patch4_32", "num_classes": 10, "img_size": 32,
                                    "pos_embed": "learned", "global_pool": "token", "in_chans": 3},
                             task="classification", class_names=[str(i) for i in range(10)],
                             preprocessing={"img_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                                            "interpolation": "bicubic"})
    catalogue = tmp_path / "catalogue"
    score(str(classifier), digits, str(catalogue), batch_size=256, outputs="embedding")
    results = run_chain(str(random_generator), str(classifier), str(catalogue), "a 7 at the top left", n=3, seed=4,
                        k=4)
    assert [r.seed for r in results] == [4, 5, 6]
    cat = Catalogue(str(catalogue))
    assert len(cat) == 1797
    from PIL import Image
    import io

    images = [np.asarray(Image.open(io.BytesIO(r.png)).convert("RGB")) for r in results]
    probs = Predictor.from_export(classifier).probabilities(images)
    emb = np.stack(Predictor.from_export(classifier, outputs="embedding").predict(images))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    for r, p, e in zip(results, probs, emb):
        assert r.label == int(np.argmax(p)) and r.name == str(r.label) and abs(r.score - p.max()) < 1e-5
        sims = cat.vectors @ e
        assert [x.id for x in r.lookalikes] == [cat.ids[j] for j in np.argsort(-sims, kind="stable")[:4]]
        assert all(abs(x.similarity - sims[cat.ids.index(x.id)]) < 1e-4 for x in r.lookalikes)
        hit = r.lookalikes[0]
        t = pq.read_table(hit.source, columns=["id", "image"])
        assert hit.image == t.filter(pc.equal(t.column("id"), hit.id)).column("image")[0].as_py()

    out = tmp_path / "out"
    res = cli("generate", "a 7 at the top left", "--model", str(random_generator), "--classify", str(classifier),
              "--catalogue", str(catalogue), "--k", "2", "--n", "1", "--seed", "4", "-o", str(out), timeout=180)
    assert res.returncode == 0, res.stderr
    rec = json.loads((out / "generated.jsonl").read_text().splitlines()[0])
    assert (rec["label"], [x["id"] for x in rec["lookalikes"]]) == (results[0].label,
                                                                     [x.id for x in results[0].lookalikes[:2]])
    assert (out / rec["lookalikes"][0]["file"]).read_bytes() == results[0].lookalikes[0].image
    res = cli("generate", "a 7", "--model", str(random_generator), "--catalogue", str(tmp_path / "cls"), "-o",
              str(tmp_path / "x"), timeout=120)
    assert res.returncode == 2 and "not a `vitray embed` output" in res.stderr, res.stderr


def test_a_label_conditioned_generator_trains_and_samples_the_class_a_prompt_names():
    """The class-id condition (generation.condition: label): the DiT gets an embedding table of num_classes + 1
    rows, a step lowers nothing to NaN, and prompts map to the class they name ("a 3", "a large 3 at the top")."""
    from vitray.config import parse_config
    from vitray.tasks.generation.train import GenerationTask

    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "img_size": 32, "num_classes": 4},
                        "train": {"task": "generation"}, "generation": {"condition": "label", "sample_steps": 2}})
    task = GenerationTask(cfg, ["0", "1", "2", "3"])
    model = task.build_model()
    assert model.c_embedder.embedding_table.num_embeddings == 5 and model.arch.cond_dim == 0
    task.setup(torch.device("cpu"), torch.float32)
    batch = {"image": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 3, 0, 1]),
             "caption": torch.zeros(6, CAPTION_BYTES, dtype=torch.uint8)}
    loss = task.training_loss(model, batch, torch.float32)
    loss.backward()
    assert torch.isfinite(loss) and model.final_layer.linear.weight.grad.abs().sum() > 0
    assert torch.equal(task.condition(batch), batch["label"])
    images = task.generate(model, ["a 3", "a large 3 at the top", "a 1"], seed=0)
    assert images.shape == (3, 3, 32, 32)
