"""Generation training: the rectified-flow velocity loss with the condition dropped for ``cond_dropout`` of the rows
(classifier-free guidance), and evaluation with a fixed noise and time per val image (``val/loss`` compares across
epochs and runs) plus a grid of samples for fixed prompts and seeds, drawn with the sampler's settings.

Conditions: ``caption``, the frozen sentence encoder's vector of each row's caption (a row without one, such as a
classification pack's, is captioned with its class name); ``label``, the class id. Encoded captions are cached per
worker (captions repeat across epochs)."""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch

from vitray.tasks.generation.judge import Judge, Moments, frechet_distance, prompted_class
from vitray.train.tasks import Metric, Task

__all__ = ["TRAINING", "GenerationTask", "GenerationMetric", "EVAL_SEED", "class_caption"]

EVAL_SEED = 21_223_009  # val noise and times: drawn from this seed at every pass
CACHE = 65_536  # captions kept encoded per worker
GRID_SAMPLES = 4  # samples per grid prompt
GRID_PROMPTS = 6


def class_caption(name: str) -> str:
    """The caption of a classification pack's row: its class name, as the composer writes one item."""
    from vitray.data.compose import _article

    return f"{_article(name)} {name}"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, 3) (grey repeated to RGB)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.repeat(1, 1, 1, 3) if x.shape[-1] == 1 else x


class GenerationMetric(Metric):
    def __init__(self, task, pictures=0):
        super().__init__(task, pictures)
        self.sums = None  # (loss sum over images, images)
        self.prompts: list[str] = []
        self.real: list[torch.Tensor] = []
        self.grid = None  # (prompts, samples in [-1, 1]) drawn at sync with the weights being evaluated
        self.judged = None  # (rows judged, generated correct, real correct) float64
        self.gen_moments, self.real_moments = Moments(), Moments()
        task._judge_left = task.cfg.generation.judge_samples

    def update(self, outputs, batch):
        loss, captions, judged = outputs
        if judged is not None:
            counts, gen_feats, real_feats = judged
            self.judged = counts if self.judged is None else self.judged + counts
            self.gen_moments.add(gen_feats)
            self.real_moments.add(real_feats)
        s = torch.stack([loss.double().sum(), torch.tensor(float(len(loss)), dtype=torch.float64, device=loss.device)])
        self.sums = s if self.sums is None else self.sums + s
        for text, img in zip(captions, batch["image"]):
            if len(self.prompts) < GRID_PROMPTS and text not in self.prompts:
                self.prompts.append(text)
                self.real.append(img.cpu())

    def sync(self, reduce, gather=None):
        self.sums = reduce(self.sums if self.sums is not None else torch.zeros(2, dtype=torch.float64)).cpu()
        judge = self.task.judge
        if judge is not None:  # every rank reduces, judged rows or not
            dim, device = judge.dim, self.task.device
            zeros = torch.zeros(3, dtype=torch.float64, device=device)
            self.judged = reduce(self.judged if self.judged is not None else zeros).cpu()
            self.gen_packed = reduce(self.gen_moments.packed(dim, device)).cpu()
            self.real_packed = reduce(self.real_moments.packed(dim, device)).cpu()
        if self.keep:  # every rank samples as many images (under ZeRO-3 a forward is a collective)
            g = self.task.cfg.generation
            own = list(g.grid_prompts) if g.grid_prompts else self.prompts[:GRID_PROMPTS]
            run = own if g.grid_prompts else ((own or [""]) * GRID_PROMPTS)[:GRID_PROMPTS]
            images = self.task.generate(self.task.model, [p for p in run for _ in range(GRID_SAMPLES)],
                                        seed=g.grid_seed)
            self.grid = (own, images[:len(own) * GRID_SAMPLES])

    def compute(self):
        loss_sum, n = self.sums.tolist()
        out = {"val/loss": loss_sum / max(n, 1.0)}
        if self.task.judge is not None and self.judged is not None and self.judged[0] > 0:
            rows, gen_ok, real_ok = self.judged.tolist()
            out.update({"val/cond_acc": gen_ok / rows, "val/judge_real_acc": real_ok / rows,
                        "val/judged_samples": rows})
            dim = self.task.judge.dim
            n1, mu1, cov1 = Moments.stats(self.gen_packed, dim)
            n2, mu2, cov2 = Moments.stats(self.real_packed, dim)
            if n1 > 1 and n2 > 1:
                out["val/fd"] = frechet_distance(mu1, cov1, mu2, cov2)
        return out

    def pictures(self, is_rank0):
        if not self.keep or not is_rank0 or self.grid is None or not self.grid[0]:
            return {}
        g = self.task.cfg.generation
        prompts, samples = self.grid
        samples = to_uint8(samples).view(len(prompts), GRID_SAMPLES, *samples.shape[-2:], 3).numpy()
        real = None
        if not g.grid_prompts and len(self.real) == len(prompts):
            real = torch.stack(self.real).permute(0, 2, 3, 1).numpy()
            real = real.repeat(3, axis=-1) if real.shape[-1] == 1 else real
        from vitray.tracking.figures import generation_grid_image

        return {"pictures/val_samples.png": partial(
            generation_grid_image, prompts, samples, real,
            f"{g.sample_steps} Euler steps, guidance {g.guidance:g}, seed {g.grid_seed}")}


class GenerationTask(Task):
    name = "generation"

    def __init__(self, cfg, class_names):
        self.cfg, self.class_names = cfg, list(class_names)
        self.num_classes = cfg.model.num_classes
        self.by_label = cfg.generation.condition == "label"
        if self.by_label and class_names and len(class_names) != self.num_classes:
            raise ValueError(f"model.num_classes is {self.num_classes} but the dataset has {len(class_names)} classes")
        self.encoder = None
        self.judge = None
        self._judge_left = 0
        self.model = None  # the model being trained (the sample grid draws from it)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def setup(self, device, dtype, teacher_path=None, judge_path=None):
        self.device, self.dtype = device, dtype
        if judge_path:
            self.judge = Judge(judge_path, device)
        if not self.by_label:
            from vitray.models.text_encoder import SentenceEncoder

            self.encoder = SentenceEncoder.from_package(self.cfg.generation.text_encoder).to(device)

    def inputs(self, batch, dtype):
        return (batch["image"].float() / 127.5 - 1.0).to(dtype)

    def captions(self, batch) -> list[str]:
        from vitray.tasks.generation.data import decode_captions

        texts = decode_captions(batch["caption"])
        labels = batch["label"].tolist()
        out = []
        for text, label in zip(texts, labels):
            if not text and 0 <= label < len(self.class_names):
                text = class_caption(self.class_names[label])
            out.append(text)
        return out

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, dim) caption vectors on the worker's device, through the cache."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, v in zip(missing, self.encoder.encode(missing, device=self.device)):
                self._cache[t] = v
            while len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        for t in texts:
            self._cache.move_to_end(t)
        return torch.stack([self._cache[t] for t in texts]).to(self.device)

    def condition(self, batch) -> torch.Tensor:
        if self.by_label:
            y = batch["label"].long()
            if (y < 0).any():
                raise ValueError("generation.condition: label, but these rows have no label (pack a "
                                 "classification set, or condition on captions)")
            return y
        return self.encode(self.captions(batch))

    def training_loss(self, model, batch, dtype):
        from vitray.models.flow import flow_loss

        self.model = model
        x = self.inputs(batch, dtype)
        drop = torch.rand(x.shape[0], device=x.device) < self.cfg.generation.cond_dropout
        return flow_loss(model, x, self.condition(batch), drop)

    @torch.no_grad()
    def eval_outputs(self, model, batch, dtype):
        from vitray.models.flow import flow_loss

        self.model = model
        x = self.inputs(batch, dtype)
        g = torch.Generator(device=x.device).manual_seed(EVAL_SEED)
        captions = self.captions(batch)
        loss = flow_loss(model, x, self.condition(batch), generator=g, reduce=False)
        return loss, captions, self._judged(model, batch, captions)

    def _judged(self, model, batch, captions):
        """For val rows whose caption names one of the judge's classes (up to ``judge_samples`` a pass): one sample
        each (seeded), and (counts (rows, samples recognised, real images recognised), sample features, real
        features)."""
        if self.judge is None or self._judge_left <= 0:
            return None
        targets = [prompted_class(c, self.judge.names) for c in captions]
        rows = [i for i, t in enumerate(targets) if t is not None][:self._judge_left]
        if not rows:
            return None
        self._judge_left -= len(rows)
        want = torch.tensor([targets[i] for i in rows], device=self.device)
        seed = EVAL_SEED + self._judge_left  # a fixed seed per position in the pass: the same noise every epoch
        samples = self.generate(model, [captions[i] for i in rows], seed=seed).to(self.device)
        gen_feats, gen_logits = self.judge(((samples.float().clamp(-1, 1) + 1) * 127.5).round())
        real_feats, real_logits = self.judge(batch["image"][rows])
        counts = torch.tensor([len(rows), float((gen_logits.argmax(1) == want).sum()),
                               float((real_logits.argmax(1) == want).sum())], dtype=torch.float64, device=self.device)
        return counts, gen_feats, real_feats

    @torch.no_grad()
    def generate(self, model, prompts: list[str], seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] for prompts (captions, or class names when conditioned on labels)."""
        from vitray.models.flow import sample

        g, arch = self.cfg.generation, model.arch if hasattr(model, "arch") else model.module.arch
        if self.by_label:
            ids = [prompted_class(p, self.class_names) for p in prompts]
            cond = torch.tensor([0 if i is None else i for i in ids], device=self.device)
        else:
            cond = self.encode(prompts)
        was = model.training
        model.eval()
        try:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            return sample(model, cond, (arch.in_chans, arch.img_size, arch.img_size), steps=g.sample_steps,
                          guidance=g.guidance, generator=gen, dtype=self.dtype).cpu()
        finally:
            model.train(was)

    def metric(self, pictures=0):
        return GenerationMetric(self, pictures)


TRAINING = GenerationTask
