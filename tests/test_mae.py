"""MAE: masking, the loss on masked patches only, the encoder on visible patches only, the exported encoder as a
backbone (classifier, linear probe, segmenter, detector) with identical features, embeddings of any export, and
unlabeled packs. The Ray Train run (ZeRO-2, resume, reconstruction pictures, registry, `vitray embed`) is the slow
test at the end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imagegen import digits_images, encode, rgb


def _mae(**kw):
    from vitray.models import create_model
    from vitray.models.mae import MaskedAutoencoder

    torch.manual_seed(0)
    backbone = create_model("vit_pico_patch4_32", num_classes=0, pos_embed="sincos", global_pool=kw.pop("pool", "avg"))
    return MaskedAutoencoder(backbone, **kw).eval()


def _images(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


# ------------------------------------------------------------------------------------------------ mechanics
@pytest.mark.parametrize("length,ratio", [(64, 0.75), (49, 0.75), (10, 0.75), (196, 0.6), (16, 0.5), (64, 0.9)])
def test_exactly_round_ratio_times_n_patches_are_masked_per_sample(length, ratio):
    from vitray.models.mae import random_masking

    x = torch.randn(5, length, 8)
    visible, mask, ids_restore = random_masking(x, ratio, torch.Generator().manual_seed(1))
    m = round(ratio * length)
    assert (mask.sum(dim=1) == m).all() and visible.shape == (5, length - m, 8)
    # the visible tokens are exactly the unmasked ones (each once), and ids_restore inverts the shuffle
    for i in range(5):
        kept = {tuple(v.tolist()) for v in visible[i]}
        assert kept == {tuple(x[i, j].tolist()) for j in range(length) if mask[i, j] == 0}
        assert sorted(ids_restore[i].tolist()) == list(range(length))
    # a different mask per sample
    assert len({tuple(mask[i].tolist()) for i in range(5)}) == 5


def test_patchify_follows_timm_patch_tokens_and_inverts():
    from vitray.models.mae import patchify, unpatchify

    x = _images(2)
    p = patchify(x, 4)
    assert p.shape == (2, 64, 48)
    # token t is the 4x4 block at row t // 8, column t % 8 (timm PatchEmbed's row-major order), channels last
    t = 8 * 3 + 5
    assert torch.equal(p[1, t], x[1, :, 12:16, 20:24].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(p, 4, (8, 8), 3), x)


def test_loss_counts_masked_patches_only():
    from vitray.models.mae import masked_patch_loss, normalised_targets

    model = _mae()
    x = _images()
    loss, pred, mask = model(x, generator=torch.Generator().manual_seed(3))
    target, _ = normalised_targets(x, 4, True)
    assert torch.allclose(masked_patch_loss(pred, target, mask), loss)
    visible = mask == 0
    changed = target.clone()
    changed[visible] += 5.0  # the targets of visible patches: no effect
    assert torch.equal(masked_patch_loss(pred, changed, mask), loss)
    changed = target.clone()
    changed[~visible] += 0.5  # of masked patches: the loss moves
    assert (masked_patch_loss(pred, changed, mask) - loss).abs().min() > 0.1


def test_norm_pix_loss_normalises_each_target_patch():
    from vitray.models.mae import normalised_targets

    x = _images() * 3 + 1
    target, (mean, std) = normalised_targets(x, 4, True)
    assert target.mean(dim=-1).abs().max() < 1e-5
    assert (target.var(dim=-1) - 1).abs().max() < 1e-3
    raw, stats = normalised_targets(x, 4, False)
    assert stats is None and torch.allclose(target * std + mean, raw, atol=1e-5)


def test_the_encoder_sees_visible_patches_only():
    """Changing the pixels of a masked patch changes nothing the encoder returns; a visible patch changes it."""
    model = _mae()
    x = _images(1)
    latent, mask, _ = model.encode(x, 0.75, torch.Generator().manual_seed(5))
    assert latent.shape == (1, 1 + 16, 96)  # class token + 25% of 64 patches
    masked_t = int(mask[0].nonzero()[0])
    visible_t = int((mask[0] == 0).nonzero()[0])
    for t, same in ((masked_t, True), (visible_t, False)):
        y = x.clone()
        r, c = divmod(t, 8)
        y[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 3.0
        other, mask2, _ = model.encode(y, 0.75, torch.Generator().manual_seed(5))
        assert torch.equal(mask, mask2)
        assert torch.equal(latent, other) == same


def test_reconstruction_loss_falls_when_trained():
    """A few AdamW steps on real digits: the masked-patch loss drops well below where it starts."""
    from vitray.data.transforms import normalize_batch

    from PIL import Image

    images = digits_images()[0][:64]
    x = normalize_batch(torch.from_numpy(np.stack([np.asarray(Image.fromarray(im).convert("RGB").resize(
        (32, 32), Image.BICUBIC)) for im in images])).permute(0, 3, 1, 2), (0.5,) * 3, (0.5,) * 3)
    model = _mae(decoder_dim=64, decoder_depth=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(60):
        loss = model(x)[0].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_mae_refuses_a_distilled_deit_with_a_clear_message():
    from vitray.models import create_model
    from vitray.models.mae import MaskedAutoencoder

    with pytest.raises(ValueError, match="distillation token"):
        MaskedAutoencoder(create_model("deit_tiny_distilled_patch16_224", num_classes=0, img_size=32))


# --------------------------------------------------------------------------------- the encoder as a backbone
@pytest.fixture(scope="module")
def mae_export(tmp_path_factory):
    """An MAE model written as the trainer writes it (the decoder dropped)."""
    from vitray.config import parse_config
    from vitray.tasks import get_task
    from vitray.train.export import write_export

    root = tmp_path_factory.mktemp("mae")
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "pos_embed": "sincos", "global_pool": "avg"},
                        "train": {"task": "mae"}, "data": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    model = get_task("mae", "model").load("model").for_training(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # not the init: weights that must travel exactly
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    write_export(str(root / "export"), state, cfg, [], metrics={"val/recon_loss": 0.5})
    return str(root / "export"), model


def test_the_export_is_the_encoder_alone_under_timm_keys(mae_export):
    from safetensors.torch import load_file

    from vitray.models.export import load_export

    folder, mae = mae_export
    keys = set(load_file(str(Path(folder) / "model.safetensors")))
    assert keys == set(mae.backbone.state_dict())  # no decoder, no "backbone." prefix
    meta = json.loads((Path(folder) / "vitray_model.json").read_text())
    assert meta["task"] == "mae" and meta["model"]["num_classes"] == 0 and meta["model"]["mask_ratio"] == 0.75
    encoder, _ = load_export(folder)
    x = _images()
    assert torch.equal(encoder(x), mae.backbone.eval()(x))


@pytest.mark.parametrize("probe", [False, True])
def test_a_classifier_from_the_encoder_gives_identical_features(mae_export, probe):
    """Strict key check of the encoder (only the new head is missing), pooled features equal to 1e-6 (fp32); the
    probe freezes everything but its BatchNorm (no affine) + linear head."""
    from vitray.config import parse_config
    from vitray.models.export import load_export
    from vitray.train.tasks import build_task

    folder, _ = mae_export
    encoder, _ = load_export(folder)
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 10, "global_pool": "avg",
                                  "checkpoint": folder, "drop_path": 0.0 if probe else 0.1},
                        "train": {"linear_probe": probe, "layer_decay": None if probe else 0.75}})
    model = build_task(cfg, [str(i) for i in range(10)]).build_model().eval()
    x = _images()
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (features - encoder(x)).abs().max() <= 1e-6
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if probe:
        bn = model.head[0]
        assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine
        assert trainable == {"head.1.weight", "head.1.bias"}
    else:
        assert "blocks.0.attn.qkv.weight" in trainable and model.head.weight.shape == (10, 96)


def test_the_encoder_fine_tunes_at_another_input_size_with_resampled_positions(mae_export):
    from vitray.config import parse_config
    from vitray.models.export import load_export
    from vitray.train.tasks import build_task

    folder, _ = mae_export
    encoder, _ = load_export(folder)
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 10, "img_size": 48,
                                  "global_pool": "avg", "checkpoint": folder}})
    model = build_task(cfg, [str(i) for i in range(10)]).build_model()
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 96)  # timm's filter resampled the 8x8 grid to 12x12
    own = encoder.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in model.state_dict().items() if k in own and k != "pos_embed")


def test_a_linear_probe_exports_and_reloads_with_its_head(tmp_path, mae_export):
    from vitray.config import parse_config
    from vitray.models.export import load_export
    from vitray.train.export import write_export
    from vitray.train.tasks import build_task

    folder, _ = mae_export
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 10, "global_pool": "avg",
                                  "checkpoint": folder}, "train": {"linear_probe": True}})
    model = build_task(cfg, [str(i) for i in range(10)]).build_model()
    model.train()
    model(_images(8))  # BatchNorm running statistics move
    model.eval()
    write_export(str(tmp_path / "probe"), model.state_dict(), cfg, [str(i) for i in range(10)], metrics={})
    again, meta = load_export(tmp_path / "probe")
    assert meta["model"]["probe_norm"] is True
    x = _images()
    assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_dense_tasks_take_the_encoder_as_their_backbone(task, mae_export):
    from vitray.config import parse_config
    from vitray.models.export import load_export
    from vitray.tasks import get_task

    folder, _ = mae_export
    encoder, _ = load_export(folder)
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 3, "checkpoint": folder},
                        "train": {"task": task}})
    model = get_task(task, "model").load("model").for_training(cfg)
    own = encoder.state_dict()
    theirs = model.backbone.state_dict()
    for k, v in theirs.items():  # the token-pooled backbone's final norm is the encoder's (avg-pooled) fc_norm
        assert torch.equal(v, own[k if k in own else k.replace("norm.", "fc_norm.", 1)]), k


def test_vitray_embed_features_are_the_pooled_pre_logits_of_any_export(tmp_path, mae_export):
    """The Predictor's embedding outputs: a classifier's pre-logits features; an MAE export's own output."""
    from vitray.config import parse_config
    from vitray.models.export import load_export
    from vitray.predict import Predictor, normalise
    from vitray.tasks import get_task
    from vitray.train.export import write_export

    folder, _ = mae_export
    cfg = parse_config({"model": {"name": "vit_pico_patch4_32", "num_classes": 3}})
    clf = get_task("classification", "model").load("model").for_training(cfg)
    write_export(str(tmp_path / "clf"), clf.state_dict(), cfg, ["a", "b", "c"], metrics={})
    images = [encode(rgb(i, (40, 30))) for i in range(3)]
    for export in (str(tmp_path / "clf"), folder):
        model, meta = load_export(export)
        p = Predictor(model, meta, outputs="embedding")
        crops, _ = p.prepare_all(images)
        want = model.forward_head(model.forward_features(normalise(crops, meta)), pre_logits=True)
        got = np.stack(p.predict(images))
        assert got.shape == (3, 96) and np.abs(got - want.detach().numpy()).max() <= 1e-6
        assert list(p.frame(images).columns) == ["embedding"]


# -------------------------------------------------------------------------------------------- data and config
def test_a_flat_folder_packs_as_an_unlabeled_set_with_bad_files_counted(tmp_path):
    from vitray.data.pack import pack

    src = tmp_path / "photos"
    src.mkdir()
    for i in range(12):
        (src / f"IMG_{i:04d}.jpg").write_bytes(encode(rgb(i, (30 + 3 * i, 40)), "JPEG"))
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    m = pack(str(src), str(tmp_path / "shards"), "imagefolder", val_fraction=0.25, progress=False)
    assert m.task == "mae" and m.class_names == [] and sum(m.counts.values()) == 12
    assert [s["path"] for s in m.skipped] == [str(src / "broken.jpg")]
    import pyarrow.parquet as pq

    cols = pq.read_schema(m.files(str(tmp_path / "shards"), "train")[0]).names
    assert "label" not in cols and "image" in cols


def test_mae_config_errors_name_the_field():
    from vitray.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"mae: .*decoder_dim 100 must be divisible by decoder_heads \(3\)"):
        parse_config({"train": {"task": "mae"}, "mae": {"decoder_dim": 100, "decoder_heads": 3}})
    with pytest.raises(ConfigError, match=r"mae\.mask_ratio"):
        parse_config({"mae": {"mask_ratio": 1.0}})
    with pytest.raises(ConfigError, match=r"train\.linear_probe: a segmentation model has no linear head"):
        parse_config({"train": {"task": "segmentation", "linear_probe": True}})
    cfg = parse_config({"train": {"task": "mae"}})
    assert (cfg.cluster.checkpoint_score_metric, cfg.cluster.checkpoint_score_mode) == ("val/recon_loss", "min")


def test_vitray_embed_command_usage(tmp_path, capsys, mae_export):
    """`vitray embed` is score's job with embeddings: the same arguments (no --top-k), the same usage errors (exit 2,
    one line naming the command, before Ray starts)."""
    from vitray.cli import main

    folder, _ = mae_export
    with pytest.raises(SystemExit) as err:
        main(["embed", "--help"])
    assert err.value.code == 0 and "--top-k" not in capsys.readouterr().out
    assert main(["embed", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    assert "embed: --model required" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["embed", "--model", folder, "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "nothing to score" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ end to end (Ray)
def _flat_digits(root: Path, n: int = 700) -> None:
    """Real digits as people keep unlabeled photos: one flat folder, mixed sizes, two broken files."""
    from PIL import Image

    images, _ = digits_images()
    root.mkdir(parents=True)
    for i, img in enumerate(images[:n]):
        s = (8, 16, 24, 32)[i % 4]
        (root / f"scan_{i:04d}.png").write_bytes(encode(Image.fromarray(img, "L").resize((s, s), Image.NEAREST)))
    (root / "scan_broken.png").write_bytes(encode(Image.fromarray(images[0], "L"))[:40])
    (root / "notes.txt").write_bytes(b"not an image\n")


@pytest.mark.slow
def test_mae_pretrains_on_unlabeled_images_resumes_after_a_kill_and_its_encoder_embeds_and_probes(
        ray_cluster, digits, tmp_path, monkeypatch):
    """Pack a flat folder -> MAE on Ray Train + DeepSpeed ZeRO-2 (2 workers), a worker killed at step 5 and the run
    resumed from the step-4 checkpoint -> reconstruction loss falls, pictures every epoch, the encoder registered
    as a backbone -> `vitray embed` of the labelled digits through the registry (exactly once) -> a linear probe
    of the registered encoder (frozen parameters under ZeRO-2)."""
    import yaml

    from recipes import make_cfg, read_log
    from vitray.batch import score
    from vitray.batch.inputs import InputError
    from vitray.config import parse_config
    from vitray.data.pack import pack
    from vitray.tracking import default_tracking_uri
    from vitray.tracking.uris import client_for
    from vitray.train import run_training

    _flat_digits(tmp_path / "scans")
    m = pack(str(tmp_path / "scans"), str(tmp_path / "shards"), "imagefolder", val_fraction=0.15, progress=False)
    assert m.task == "mae" and len(m.skipped) == 2
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs/configs/mae_digits_vit_pico.yaml").read_text())
    recipe["data"].update({"path": str(tmp_path / "shards"), "batch_size": 64})
    recipe["train"].update({"epochs": 4, "warmup_epochs": 1, "log_every_steps": 1, "checkpoint_every_steps": 4})
    recipe["cluster"].update({"storage_path": str(tmp_path / "runs"), "max_failures": 1})
    recipe["tracking"].update({"flush_interval_s": 1.0})
    marker = tmp_path / "killed"
    monkeypatch.setenv("VITRAY_TEST_KILL_AT_STEP", "5")
    monkeypatch.setenv("VITRAY_TEST_KILL_MARKER", str(marker))
    result = run_training(parse_config(recipe))
    monkeypatch.delenv("VITRAY_TEST_KILL_AT_STEP")
    assert marker.read_text() == "5"
    steps = m.counts["train"] // 128
    assert result.metrics["step"] == 4 * steps
    log = read_log(result.run_dir)
    resumed = [i for i, r in enumerate(log) if r.get("event") == "resumed"]
    assert len(resumed) == 1 and log[resumed[0]]["step"] == 4
    assert [r["step"] for r in log[resumed[0] + 1:] if "train/loss" in r] == list(range(5, 4 * steps + 1))

    client = client_for(default_tracking_uri())
    run = client.get_run(result.mlflow_run_id)
    recon = [h.value for h in sorted(client.get_metric_history(run.info.run_id, "val/recon_loss"), key=lambda h: h.step)]
    assert len(recon) >= 4 and recon[-1] < 0.9 * recon[0], recon  # reconstruction loss falls
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert "pictures/val_reconstructions.png" in pictures
    for epoch in (1, 4):
        assert [a.path for a in client.list_artifacts(run.info.run_id, f"pictures/epoch_{epoch:03d}")] == \
            [f"pictures/epoch_{epoch:03d}/val_reconstructions.png"]
    reg = result.registration
    assert (reg.name, reg.alias) == ("digits-mae", "champion")
    mv = client.get_model_version("digits-mae", reg.version)
    assert "a backbone, not a classifier" in mv.description and mv.tags["vitray.task"] == "mae"

    # vitray embed: the registered encoder's embeddings of the labelled digits, each id exactly once
    out = tmp_path / "embeddings"
    summary = score("models:/digits-mae@champion", digits, str(out), batch_size=128, outputs="embedding")
    assert summary.rows == 1797 and summary.error_rows == 0
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    assert table.num_rows == len(set(table.column("id").to_pylist())) == 1797
    assert table.schema.field("embedding").type.value_type.bit_width == 32
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.shape == (1797, 96) and np.isfinite(emb).all() and emb.std(axis=0).mean() > 1e-3
    again = score("models:/digits-mae@champion", digits, str(out), batch_size=128, outputs="embedding")
    assert again.rows_this_run == 0 and pq.read_table(out).num_rows == 1797  # a rerun adds nothing
    with pytest.raises(InputError, match="holds `vitray embed` embeddings"):
        score("models:/digits-mae@champion", digits, str(out))

    # a linear probe of the registered encoder: only the head moves, under ZeRO-2
    probe = run_training(make_cfg(digits, tmp_path / "probe", model={"checkpoint": "models:/digits-mae@champion",
                                                                     "global_pool": "avg"},
                                  train={"epochs": 1, "linear_probe": True, "lr": 3e-2, "weight_decay": 0.0,
                                         "warmup_epochs": 0},
                                  tracking={"enabled": True, "registered_model": None}))
    from safetensors.torch import load_file

    encoder = load_file(str(Path(result.export_dir) / "model.safetensors"))
    probed = load_file(str(Path(probe.export_dir) / "model.safetensors"))
    assert {k for k in probed if not k.startswith("head.")} == set(encoder)
    assert all(torch.equal(probed[k], encoder[k]) for k in encoder)  # the frozen encoder did not move
    assert probed["head.0.running_mean"].abs().sum() > 0  # the BatchNorm (no affine) gathered its statistics
    assert probed["head.1.bias"].abs().max() > 1e-3  # the linear head trained (timm starts its bias at zero)
    assert "val/top1" in probe.metrics
