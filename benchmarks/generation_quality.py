"""How good are the generator's images? Judged by a classifier trained on the real images: does a sample show the
digit its prompt asked for (conditional accuracy, against the same classifier's accuracy on real val images), and
how far are the samples from real images in the classifier's features (Frechet distance, against the distance
between two halves of the real val set and against pure noise).

    python benchmarks/generation_quality.py                  # the README's table (about 35 min on 2 cores)
    python benchmarks/generation_quality.py --epochs 3       # a quick look

Data: scikit-learn's bundled digits (1,797 real 8x8 scans shipped inside the package), split once (seeded,
stratified) into train 70% / val 30% and written as an image folder (train/CLASS/IMAGE, val/CLASS/IMAGE). Each train
image is written --repeat times for the generator's pack (ids differ, pixels do not), so an epoch holds enough steps
that per-epoch work (evaluation, checkpoint) does not dominate. Prompts are the class captions the generator trains
on: "a 0" ... "a 9" (a classification pack's rows are captioned with their class name).

Every run is a real `vitray train` run in this process (Ray Train, 2 workers, DeepSpeed ZeRO-2, the task registry):

1. the judge: a ViT classifier (the quickstart recipe) on the train split;
2. the generator: a DiT shaped like vit_pico_patch4_32, conditioned on the caption through the frozen
   all-MiniLM-L6-v2, rectified flow, EMA, --epochs epochs, judged every epoch (val/cond_acc, val/fd in MLflow);
3. from its export (`vitray.tasks.generation.generator.Generator`, what `vitray generate` runs): --per-class samples
   for each prompt at guidance 0 (the prompt ignored: chance), 1 and the model's default, each judged.

FD here is FID's formula in the judge's pooled features (96 numbers), with a few hundred images a side: it compares
runs judged by the same classifier on the same set, and nothing else (not FID).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

JUDGE = {  # the quickstart's classification recipe
    "model": {"name": "vit_pico_patch4_32", "num_classes": 10, "pos_embed": "sincos", "global_pool": "avg"},
    "data": {"batch_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "eval_transforms": {"crop_pct": 1.0},
             "train_transforms": {"scale": [0.6, 1.0], "hflip": 0.0}},
    "train": {"epochs": 30, "lr": 6.0e-3, "warmup_epochs": 2, "label_smoothing": 0.1, "log_every_steps": 100},
    "deepspeed": {"zero_stage": 2, "grad_clip": 1.0},
    "cluster": {"num_workers": 2},
    "tracking": {"enabled": False},
}
GENERATOR = {
    "model": {"name": "vit_pico_patch4_32", "img_size": 32, "num_classes": 10},
    "data": {"batch_size": 64},
    "train": {"task": "generation", "lr": 4.0e-3, "warmup_epochs": 1, "log_every_steps": 100},
    "generation": {"condition": "caption", "sample_steps": 12, "guidance": 2.0, "judge_samples": 300},
    "deepspeed": {"zero_stage": 2, "grad_clip": 1.0},
    "cluster": {"num_workers": 2},
}


def write_digits(root: Path, repeat: int, seed: int = 0) -> tuple[Path, Path]:
    """Two image folders with the same val split: the judge's (train once) and the generator's (train x repeat)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    train, val = train_test_split(idx, test_size=0.3, stratify=d.target, random_state=seed)
    folders = (root / "judge-images", root / "gen-images")
    for folder, reps in zip(folders, (1, repeat)):
        for split, ids, k in (("train", train, reps), ("val", val, 1)):
            for i in ids:
                out = folder / split / str(d.target[i])
                out.mkdir(parents=True, exist_ok=True)
                img = Image.fromarray((d.images[i] * (255 / 16)).round().astype(np.uint8), "L")
                for r in range(k):
                    img.save(out / f"{i:04d}-{r}.png")
    return folders


def features(judge, images) -> tuple:
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    feats, logits = [], []
    for i in range(0, len(x), 256):
        f, lg = judge(x[i:i + 256])
        feats.append(f)
        logits.append(lg)
    return torch.cat(feats).double().numpy(), torch.cat(logits).argmax(1).numpy()


def fd(a, b) -> float:
    import numpy as np

    from vitray.tasks.generation.judge import frechet_distance

    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=24, help="generator epochs (default 24)")
    ap.add_argument("--repeat", type=int, default=8, help="copies of each train image in the generator's pack")
    ap.add_argument("--per-class", type=int, default=60, help="samples per prompt in the final judgement")
    ap.add_argument("--work", default=None, help="working folder (default: a temp folder)")
    args = ap.parse_args()

    import numpy as np
    import ray

    from vitray.config import parse_config
    from vitray.data.pack import pack
    from PIL import Image

    from vitray.tasks.generation.data import CODEC
    from vitray.tasks.generation.generator import Generator
    from vitray.tasks.generation.judge import Judge
    from vitray.train import run_training

    work = Path(args.work or tempfile.mkdtemp(prefix="vitray-genq-"))
    judge_images, gen_images = write_digits(work, args.repeat)
    judge_pack = pack(str(judge_images), str(work / "judge-shards"), "imagefolder", progress=False)
    gen_pack = pack(str(gen_images), str(work / "gen-shards"), "imagefolder", progress=False)
    print(f"[genq] judge pack {judge_pack.counts}, generator pack {gen_pack.counts} (x{args.repeat} train)", flush=True)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

    t0 = time.perf_counter()
    cfg = parse_config({**JUDGE, "data": {**JUDGE["data"], "path": str(work / "judge-shards")},
                        "cluster": {**JUDGE["cluster"], "storage_path": str(work / "runs"), "run_name": "judge"}})
    judge_run = run_training(cfg)
    judge_s = time.perf_counter() - t0
    print(f"[genq] judge: val top-1 {judge_run.metrics.get('val/top1', float('nan')):.3f} in {judge_s:.0f}s",
          flush=True)

    t0 = time.perf_counter()
    g = GENERATOR
    cfg = parse_config({**g, "data": {**g["data"], "path": str(work / "gen-shards")},
                        "train": {**g["train"], "epochs": args.epochs},
                        "generation": {**g["generation"], "judge": judge_run.export_dir},
                        "cluster": {**g["cluster"], "storage_path": str(work / "runs"), "run_name": "generator"},
                        "tracking": {"uri": f"sqlite:///{work}/mlflow.db", "experiment": "generation-quality"}})
    gen_run = run_training(cfg)
    gen_s = time.perf_counter() - t0
    m = gen_run.metrics
    print(f"[genq] generator: {args.epochs} epochs, {int(m.get('step', 0))} steps in {gen_s:.0f}s; last eval "
          f"cond_acc {m.get('val/cond_acc', float('nan')):.3f} fd {m.get('val/fd', float('nan')):.1f}", flush=True)

    judge = Judge(judge_run.export_dir, "cpu")
    val_files = sorted((gen_images / "val").rglob("*.png"))
    resize = CODEC.eval_transform(32, 1.0, "bicubic")  # what the generator's pipeline does to a real image
    real = np.stack([resize(np.asarray(Image.open(p).convert("RGB")))[0] for p in val_files])
    real_labels = np.array([int(p.parent.name) for p in val_files])
    real_f, real_pred = features(judge, real)
    real_acc = float((real_pred == real_labels).mean())
    half = np.random.default_rng(0).permutation(len(real_f))
    a, b = half[: len(half) // 2], half[len(half) // 2:]
    noise = np.random.default_rng(1).integers(0, 256, size=(len(real), 32, 32, 3), dtype=np.uint8)
    rows = [("real val images (the judge's own accuracy)", real_acc, fd(real_f[a], real_f[b]),
             f"FD between two halves ({len(a)} / {len(b)})"),
            ("uniform noise", float("nan"), fd(features(judge, noise)[0], real_f), "FD to real val")]

    gen = Generator(gen_run.export_dir, "cpu", width=100)
    prompts = [f"a {c}" for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(len(prompts)))
    want = np.repeat(np.arange(10), args.per_class)
    per_class = {}
    for guidance in (0.0, 1.0, gen.guidance):
        t1 = time.perf_counter()
        images = gen.generate(prompts, seeds, guidance=guidance)
        f, pred = features(judge, images)
        acc = float((pred == want).mean())
        per_class[guidance] = [float((pred[want == c] == c).mean()) for c in range(10)]
        rows.append((f"generated, guidance {guidance:g} ({len(prompts)} samples, {gen.steps} steps, "
                     f"{time.perf_counter() - t1:.0f}s)", acc, fd(f, real_f), "FD to real val"))
    print()
    print(f"| images | conditional accuracy (judge) | FD in the judge's features | FD of |")
    print("|---|---|---|---|")
    for name, acc, dist, what in rows:
        print(f"| {name} | {'-' if acc != acc else f'{acc:.3f}'} | {dist:.1f} | {what} |")
    print()
    print(f"per-class accuracy at guidance {gen.guidance:g}: " +
          ", ".join(f"{c}: {v:.2f}" for c, v in enumerate(per_class[gen.guidance])))
    print(f"judge trained in {judge_s:.0f}s; generator trained in {gen_s:.0f}s ({args.epochs} epochs, "
          f"{int(m.get('step', 0))} optimizer steps, global batch 128)")
    (work / "generation_quality.json").write_text(json.dumps(
        {"rows": rows, "per_class": {str(k): v for k, v in per_class.items()}, "judge_s": judge_s,
         "generator_s": gen_s, "epochs": args.epochs, "steps": m.get("step")}, indent=1))
    print(f"[genq] details: {work / 'generation_quality.json'}; MLflow: sqlite:///{work}/mlflow.db "
          f"(`vitray ui --tracking-uri ...`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
