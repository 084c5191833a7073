"""Sampling from a generator export: the DiT, its text encoder (or class names) and the sampler's defaults, as the
export records them. What `vitray generate`, ``POST /v1/generate`` and the quality benchmark run.

Each image's start noise comes from its own seed (a generator per row), so an image depends only on its prompt,
seed, steps and guidance, never on what else shares its batch; the sampler runs at a fixed batch width (rows are
padded) so that the kernels, and therefore the bytes, are the same however requests are batched.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from vitray.tasks.generation.infer import MAX_GUIDANCE, MAX_PROMPT, MAX_STEPS  # the route's limits

__all__ = ["Generator", "GenerateError", "png_bytes", "MAX_STEPS", "MAX_GUIDANCE", "MAX_PROMPT"]


class GenerateError(ValueError):
    """A bad prompt or sampler setting, or an export that is not a generator."""


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), "RGB").save(buf, format="PNG")
    return buf.getvalue()


class Generator:
    def __init__(self, export: str | Path, device: str | torch.device = "cpu", width: int = 16):
        from vitray.models.export import load_export, read_export_meta

        meta = read_export_meta(export)
        if meta.get("task") != "generation":
            raise GenerateError(f"{export}: a {meta.get('task')} model, not a generator (train.task: generation)")
        self.model, self.meta = load_export(export, device)
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.arch = self.meta["model"]
        self.width = max(1, int(width))
        self.encoder = None
        self.class_names = [str(n) for n in self.meta.get("class_names") or []]
        if self.arch["condition"] == "caption":
            from vitray.models.text_encoder import SentenceEncoder

            self.encoder = SentenceEncoder.from_package(self.arch["text_encoder"]).to(self.device)
        # what the serving layer reads of any loaded model
        self.task, self.runtime, self.precision = "generation", "torch", "fp32"
        self.input_size = int(self.arch["img_size"])
        self.steps = int(self.arch.get("sample_steps", 12))
        self.guidance = float(self.arch.get("guidance", 2.0))

    @property
    def example_prompt(self) -> str:
        from vitray.tasks.generation.train import class_caption

        return class_caption(self.class_names[0]) if self.encoder is None and self.class_names else "a 7"

    def describe(self) -> str:
        cond = (f"conditioned on captions ({self.arch['text_encoder']})" if self.encoder is not None
                else f"conditioned on {len(self.class_names)} classes")
        return (f"{cond}, {self.arch['img_size']} px, {self.steps} Euler steps and guidance {self.guidance:g} by "
                "default")

    def check(self, prompt: str, steps: int | None, guidance: float | None) -> tuple[int, float]:
        """The sampler settings a request gets; :class:`GenerateError` naming what is out of range."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise GenerateError("prompt: empty")
        if len(prompt) > MAX_PROMPT:
            raise GenerateError(f"prompt: {len(prompt)} characters, at most {MAX_PROMPT}")
        steps = self.steps if steps is None else steps
        guidance = self.guidance if guidance is None else guidance
        if not (isinstance(steps, int) and 1 <= steps <= MAX_STEPS):
            raise GenerateError(f"steps: {steps!r}, must be an integer in [1, {MAX_STEPS}]")
        if not (isinstance(guidance, (int, float)) and 0.0 <= guidance <= MAX_GUIDANCE):
            raise GenerateError(f"guidance: {guidance!r}, must be in [0, {MAX_GUIDANCE:g}]")
        if self.encoder is None:
            from vitray.tasks.generation.judge import prompted_class

            if prompted_class(prompt, self.class_names) is None:
                raise GenerateError(f"prompt: {prompt!r} names none of this model's classes "
                                    f"({', '.join(self.class_names[:20])}); it is conditioned on a class, as 'a NAME'")
        return steps, float(guidance)

    def _conditions(self, prompts: list[str]) -> torch.Tensor:
        if self.encoder is not None:
            return self.encoder.encode(prompts, device=self.device)
        from vitray.tasks.generation.judge import prompted_class

        return torch.tensor([prompted_class(p, self.class_names) for p in prompts], device=self.device)

    def frame(self, frame, steps: int | None = None, guidance: float | None = None):
        """The MLflow pyfunc: ``prompt`` (and optional ``seed``) per row -> ``image`` (PNG bytes), ``prompt``, ``seed``."""
        import pandas as pd

        if "prompt" not in frame.columns:
            raise GenerateError(f"input needs a column 'prompt'; got {list(frame.columns)}")
        prompts = [str(p) for p in frame["prompt"]]
        seeds = [int(x) for x in frame["seed"]] if "seed" in frame.columns else list(range(len(prompts)))
        images = self.generate(prompts, seeds, steps=None if steps is None else int(steps),
                               guidance=None if guidance is None else float(guidance))
        return pd.DataFrame({"image": [png_bytes(im) for im in images], "prompt": prompts, "seed": seeds})

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], steps: int | None = None,
                 guidance: float | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) images, one per (prompt, seed); every row with the same steps and guidance."""
        from vitray.models.flow import sample

        if len(prompts) != len(seeds):
            raise GenerateError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        c, s = int(self.arch["in_chans"]), int(self.arch["img_size"])
        if not prompts:
            return np.zeros((0, s, s, 3), dtype=np.uint8)
        steps, guidance = self.check(prompts[0], steps, guidance)
        for p in prompts[1:]:
            self.check(p, steps, guidance)
        out = []
        for i in range(0, len(prompts), self.width):
            chunk, chunk_seeds = prompts[i:i + self.width], seeds[i:i + self.width]
            pad = self.width - len(chunk)
            cond = self._conditions(chunk + [chunk[-1]] * pad)
            noise = torch.stack([torch.randn((c, s, s), generator=torch.Generator().manual_seed(int(seed)))
                                 for seed in chunk_seeds + [chunk_seeds[-1]] * pad]).to(self.device)
            x = sample(self.model, cond, (c, s, s), steps=steps, guidance=guidance, noise=noise)[:len(chunk)]
            img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            out.append(np.repeat(img, 3, axis=-1) if c == 1 else img)
        return np.concatenate(out)
