"""The diffusion transformer and rectified flow on their own (no Ray): parity with diffusers' DiT on the same
weights, the loss falls, sampling is deterministic per seed, and guidance 0 ignores the condition."""
from __future__ import annotations

import pytest
import torch

from vitray.models.dit import DiT, DiTArch, vit_shape
from vitray.models.flow import flow_loss, sample

ARCH = dict(img_size=16, in_chans=3, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight drawn at random: the zero-initialised adaLN and output layers would make parity trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _to_diffusers(dit: DiT):
    """diffusers' DiTTransformer2DModel holding ``dit``'s weights. diffusers gives every block its own timestep and
    label embedder; here all of them get the one shared embedder's weights."""
    diffusers = pytest.importorskip("diffusers")
    a = dit.arch
    ref = diffusers.DiTTransformer2DModel(
        num_attention_heads=a.num_heads, attention_head_dim=a.embed_dim // a.num_heads, in_channels=a.in_chans,
        num_layers=a.depth, sample_size=a.img_size, patch_size=a.patch_size, num_embeds_ada_norm=a.num_classes,
        norm_eps=1e-6, norm_elementwise_affine=False).eval()
    s = dit.state_dict()
    out = {"pos_embed.proj.weight": s["patch_embed.proj.weight"], "pos_embed.proj.bias": s["patch_embed.proj.bias"],
           "proj_out_1.weight": s["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": s["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": s["final_layer.linear.weight"], "proj_out_2.bias": s["final_layer.linear.bias"]}
    for i in range(a.depth):
        b, r = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = r + "norm1.emb."
        for k in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{k}"] = s[f"t_embedder.0.{k}"]
            out[emb + f"timestep_embedder.linear_2.{k}"] = s[f"t_embedder.2.{k}"]
            out[r + f"norm1.linear.{k}"] = s[b + f"adaLN_modulation.1.{k}"]
            for name, part in zip(("to_q", "to_k", "to_v"), s[b + f"attn.qkv.{k}"].chunk(3)):
                out[r + f"attn1.{name}.{k}"] = part
            out[r + f"attn1.to_out.0.{k}"] = s[b + f"attn.proj.{k}"]
            out[r + f"ff.net.0.proj.{k}"] = s[b + f"mlp.fc1.{k}"]
            out[r + f"ff.net.2.{k}"] = s[b + f"mlp.fc2.{k}"]
        out[emb + "class_embedder.embedding_table.weight"] = s["c_embedder.embedding_table.weight"]
    missing, unexpected = ref.load_state_dict(out, strict=False)
    assert not unexpected and not [k for k in missing if "pos_embed.pos_embed" not in k], (missing, unexpected)
    return ref


def test_dit_matches_diffusers_on_the_same_weights():
    torch.manual_seed(0)
    dit = _randomised(DiT(DiTArch(**ARCH, num_classes=5))).eval()
    ref = _to_diffusers(dit)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0.0, 0.25, 0.6, 1.0])
    y = torch.tensor([0, 3, 4, 1])
    with torch.no_grad():
        ours = dit(x, t, y)
        theirs = ref(x, timestep=t * 1000, class_labels=y).sample
        null = dit(x, t, y, drop=torch.ones(4, dtype=torch.bool))
        theirs_null = ref(x, timestep=t * 1000, class_labels=torch.full_like(y, 5)).sample
    assert ours.shape == x.shape
    assert ours.abs().mean() > 0.1  # not a degenerate output
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(null, theirs_null, rtol=1e-4, atol=1e-4)


def test_a_fresh_dit_is_the_zero_map_and_takes_its_shape_from_a_zoo_vit():
    dit = DiT.from_vit("vit_pico_patch4_32", img_size=32, in_chans=1, num_classes=10)
    assert (dit.arch.embed_dim, dit.arch.depth, dit.arch.num_heads, dit.arch.patch_size) == (96, 4, 3, 4)
    assert vit_shape("vit_pico_patch4_32")["mlp_ratio"] == 4.0
    out = dit(torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == (2, 1, 32, 32) and torch.count_nonzero(out) == 0  # adaLN-Zero: the output layer starts at 0
    with pytest.raises(ValueError, match="exactly one"):
        DiTArch(**ARCH)
    with pytest.raises(ValueError, match="multiple of the patch"):
        DiTArch(**{**ARCH, "img_size": 18}, num_classes=2)


def _two_blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright square top-left; class 1: bottom-right; in [-1, 1]."""
    x = -torch.ones(n, 1, 16, 16)
    y = torch.arange(n) % 2
    x[y == 0, :, 2:7, 2:7] = 1.0
    x[y == 1, :, 9:14, 9:14] = 1.0
    return x, y


def test_the_flow_loss_falls_and_guided_samples_follow_the_condition():
    torch.manual_seed(0)
    dit = DiT(DiTArch(**{**ARCH, "in_chans": 1}, num_classes=2))
    opt = torch.optim.AdamW(dit.parameters(), lr=2e-3)
    x, y = _two_blobs(32)
    losses = []
    for _ in range(150):
        drop = torch.rand(len(y)) < 0.1
        loss = flow_loss(dit, x, y, drop)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    dit.eval()
    g = torch.Generator().manual_seed(1)
    out = sample(dit, torch.tensor([0, 1] * 4), (1, 16, 16), steps=10, guidance=2.0, generator=g)
    top_left, bottom_right = out[:, 0, 2:7, 2:7].mean((1, 2)), out[:, 0, 9:14, 9:14].mean((1, 2))
    assert (top_left[0::2] > bottom_right[0::2]).all() and (bottom_right[1::2] > top_left[1::2]).all()


def test_sampling_is_deterministic_per_seed_and_guidance_zero_ignores_the_condition():
    dit = _randomised(DiT(DiTArch(**ARCH, num_classes=3)), seed=3).eval()

    def run(cond, seed, guidance):
        return sample(dit, torch.tensor(cond), (3, 16, 16), steps=4, guidance=guidance,
                      generator=torch.Generator().manual_seed(seed))

    a, b = run([0, 1], 7, 2.0), run([0, 1], 7, 2.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, run([0, 1], 8, 2.0))
    assert not torch.allclose(run([0, 0], 7, 2.0), run([2, 2], 7, 2.0))
    torch.testing.assert_close(run([0, 0], 7, 0.0), run([2, 2], 7, 0.0), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        sample(dit, torch.tensor([0]), (3, 16, 16), steps=0)


def test_a_vector_condition_and_its_null():
    dit = _randomised(DiT(DiTArch(**ARCH, cond_dim=8))).eval()
    x, t, v = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 8)
    with torch.no_grad():
        dropped = dit(x, t, v, torch.ones(2, dtype=torch.bool))
        other = dit(x, t, torch.randn(2, 8), torch.ones(2, dtype=torch.bool))
        kept = dit(x, t, v)
    torch.testing.assert_close(dropped, other)
    assert not torch.allclose(dropped, kept)
