"""The model zoo: every vitray-registered model trains on CPU; sincos, checkpoint loading, heads, feature maps."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vitray.models import (
    VITRAY_MODELS, CheckpointError, ClassificationHead, UnknownModelError, create_model, feature_maps, is_model,
    list_zoo, model_info, sincos_2d,
)
from vitray.models.zoo import default_img_size


@pytest.mark.parametrize("name", sorted(VITRAY_MODELS))
def test_registered_model_forward_backward(name):
    torch.manual_seed(0)
    size = default_img_size(name)
    model = create_model(name, num_classes=7, drop_path=0.1)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    info = model_info(name, num_classes=7)
    assert info.params == sum(p.numel() for p in model.parameters())
    assert info.gflops > 0


def test_zoo_lists_vitray_and_timm_families():
    zoo = list_zoo()
    for name in ("vit_tiny_patch4_32", "vit_base_patch16_224", "vit_huge_patch14_224", "vit_small_patch8_224",
                 "vit_base_patch32_224", "deit_tiny_patch16_224", "deit_base_distilled_patch16_224"):
        assert name in zoo and is_model(name), name
    assert not is_model("vit_base_patch16_clip_224")  # CLIP variants are outside the supported family
    assert not is_model("resnet50")


def test_model_info_matches_vit_b16_literature():
    info = model_info("vit_base_patch16_224")
    assert abs(info.params / 1e6 - 86.6) < 0.1
    assert abs(info.gmacs - 17.6) < 0.1  # DeiT paper, table 1: ViT-B 17.6 "FLOPs" (multiply-adds)


def test_unknown_model_raises():
    with pytest.raises(UnknownModelError, match="vit_nope"):
        create_model("vit_nope")


def mae_sincos(embed_dim: int, grid: int) -> np.ndarray:
    """Independent reference: MAE's get_2d_sincos_pos_embed (numpy, w-major meshgrid), with a zero cls row."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([one_d(embed_dim // 2, g[0]), one_d(embed_dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_matches_independent_formula():
    ref = mae_sincos(96, 8)
    ours = sincos_2d(96, (8, 8), num_prefix_tokens=1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    model = create_model("vit_pico_patch4_32", pos_embed="sincos")
    np.testing.assert_allclose(model.pos_embed[0].detach().numpy(), ref, atol=1e-6)
    assert not model.pos_embed.requires_grad
    # one spot check by hand: token at row 2, col 5, channel 0 is sin(col * omega_0) = sin(5)
    assert abs(ours[1 + 2 * 8 + 5, 0] - np.sin(5.0)) < 1e-6
    assert abs(ours[1 + 2 * 8 + 5, 48] - np.sin(2.0)) < 1e-6


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_timm_state_dict_gives_identical_logits(tmp_path, suffix):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64).eval()
    path = tmp_path / f"w{suffix}"
    sd = ref.state_dict()
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({"model": sd} if suffix == ".pth" else sd, path)  # .pth wrapped the way DeiT/MAE save it
    model = create_model("vit_tiny_patch16_224", num_classes=10, img_size=64, checkpoint=str(path)).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff <= 1e-5


def test_other_img_size_resamples_like_timm(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_pico_patch4_32", num_classes=10)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    model = create_model("vit_pico_patch4_32", num_classes=10, img_size=48, checkpoint=str(tmp_path / "w.pth"))
    expected = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=(12, 12), num_prefix_tokens=1)
    assert model.pos_embed.shape == expected.shape == (1, 1 + 144, 96)
    torch.testing.assert_close(model.pos_embed.detach(), expected, rtol=0, atol=1e-6)


def test_1000_class_head_reinitialised_with_warning(tmp_path, caplog):
    torch.manual_seed(0)
    ref = timm.create_model("vit_pico_patch4_32", num_classes=1000)
    save_file(ref.state_dict(), str(tmp_path / "w.safetensors"))
    with caplog.at_level(logging.WARNING, logger="vitray.models"):
        model = create_model("vit_pico_patch4_32", num_classes=10, checkpoint=str(tmp_path / "w.safetensors"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1000-class" in warnings[0].getMessage() and "re-initialised" in warnings[0].getMessage()
    assert model.head.weight.shape == (10, 96)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_distilled_deit_heads_reinitialised(tmp_path, caplog):
    ref = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=1000, img_size=32)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.WARNING, logger="vitray.models"):
        model = create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, checkpoint=str(tmp_path / "w.pth"))
    assert model.head.out_features == 5 and model.head_dist.out_features == 5
    assert sum("re-initialised" in r.getMessage() for r in caplog.records) == 2


def test_foreign_keys_are_listed(tmp_path):
    ref = timm.create_model("vit_pico_patch4_32", num_classes=10)
    sd = ref.state_dict()
    sd["extra.weight"] = torch.zeros(3)
    del sd["blocks.0.norm1.weight"]
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as e:
        create_model("vit_pico_patch4_32", num_classes=10, checkpoint=str(tmp_path / "w.pth"))
    assert "blocks.0.norm1.weight" in str(e.value) and "extra.weight" in str(e.value)


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        create_model("vit_pico_patch4_32", checkpoint=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        create_model("vit_pico_patch4_32", checkpoint=str(tmp_path / "junk.pth"))


def test_feature_maps_multi_level():
    model = create_model("vit_pico_patch4_32", num_classes=0)
    maps = feature_maps(model, torch.randn(2, 3, 32, 32), indices=[1, 3])
    assert [tuple(m.shape) for m in maps] == [(2, 96, 8, 8), (2, 96, 8, 8)]
    assert not torch.equal(maps[0], maps[1])


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_classification_head_matches_timm(pool):
    torch.manual_seed(0)
    ref = create_model("vit_pico_patch4_32", num_classes=10, global_pool=pool).eval()
    head = ClassificationHead(96, 10, pool=pool, num_prefix_tokens=ref.num_prefix_tokens).eval()
    head_sd = {k: v for k, v in ref.state_dict().items() if k.startswith(("head.", "fc_norm."))}
    head.load_state_dict(head_sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(head(ref.forward_features(x)), ref(x))


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = create_model("vit_pico_patch4_32", num_classes=10)
    b = create_model("vit_pico_patch4_32", num_classes=10, grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    torch.testing.assert_close(a.blocks[0].attn.qkv.weight.grad, b.blocks[0].attn.qkv.weight.grad)
