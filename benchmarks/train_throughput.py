"""Training throughput: vitray (Ray Data -> Ray Train -> DeepSpeed) against a plain single-process torch loop with the
same model, batch and optimizer on tensors already in memory, in one run.

    python benchmarks/train_throughput.py                     # vit_tiny_patch4_32, batch 64, fp32, on this CPU
    python benchmarks/train_throughput.py --model vit_pico_patch4_32 --steps 60

    python benchmarks/train_throughput.py --deepspeed-gpu     # on a GPU: ViT-S/16 + ViT-B/16 bf16, ZeRO 0 and 2, MFU

Rows: the plain loop (baseline); vitray 1 worker ZeRO-0 and ZeRO-2 (the worker gets all cores, like the baseline);
vitray 2 workers ZeRO-2 against 1 worker. vitray's figure is its steady-state images/s from <run>/metrics.jsonl
(optimizer steps x global batch / wall time between log lines, after the first window), which includes waiting
for data, Ray and DeepSpeed; each run's total wall time is printed too.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def make_shards(root: Path, n: int, size: int) -> str:
    from PIL import Image

    from vitray.data.pack import pack

    src = root / "src"
    rng = np.random.default_rng(0)
    for c in range(10):
        (src / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        (src / f"c{i % 10}" / f"{i:06d}.png").write_bytes(buf.getvalue())
    out = root / "shards"
    pack(str(src), str(out), "imagefolder", val_fraction=0.0, overwrite=True, progress=False)
    return str(out)


def plain_loop(model_name: str, batch: int, steps: int, warmup: int) -> float:
    import torch
    import torch.nn.functional as F

    from vitray.models import create_model
    from vitray.train.optim import build_optimizer

    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10)
    size = model.patch_embed.img_size[0]
    opt = build_optimizer(model, 1e-3, 0.05)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - t0)


def vitray_run(shards: str, storage: str, model_name: str, batch: int, steps: int, workers: int, stage: int,
               cpus_per_worker: float) -> tuple[float, float]:
    from vitray.config import parse_config
    from vitray.train import run_training

    cfg = parse_config({
        "model": {"name": model_name, "num_classes": 10},
        "data": {"path": shards, "batch_size": batch, "train_transforms": {"scale": [0.8, 1.0]}},
        "train": {"steps": steps, "lr": 1e-3, "log_every_steps": 5, "warmup_steps": 0},
        "deepspeed": {"zero_stage": stage},
        "cluster": {"num_workers": workers, "cpus_per_worker": cpus_per_worker, "storage_path": storage,
                    "run_name": f"w{workers}-z{stage}"},
        "tracking": {"enabled": False},
    })
    res = run_training(cfg)
    log = [json.loads(line) for line in (Path(res.run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/images_per_s"] for r in log if "train/images_per_s" in r][1:]  # drop the warmup window
    return float(np.median(rates)), res.seconds


def deepspeed_gpu(models: list[str], batch: int, steps: int) -> None:
    """vitray's engine factory (param groups, schedule, DeepSpeed config) on one GPU, bf16, ZeRO 0 and 2, against a
    plain bf16-autocast torch loop; MFU = 3 x forward FLOPs/image x images/s / the measured bf16 matmul rate."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from vitray.config import parse_config
    from vitray.models import create_model, model_info
    from vitray.train.loop import build_engine
    from vitray.train.plan import TrainPlan

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)  # what Ray Train / torchrun set for each worker
    dist.init_process_group("nccl", rank=0, world_size=1)
    dev = torch.device("cuda")
    n = 8192
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    peak = 2 * n**3 * 20 / (time.perf_counter() - t0)
    print(f"device: {torch.cuda.get_device_name()}; bf16 matmul {peak / 1e12:.1f} TFLOP/s; torch {torch.__version__}; batch {batch}")
    print("\n| model | engine | train img/s | MFU | vs plain |\n|---|---|---|---|---|")
    for name in models:
        flops = model_info(name).gflops * 1e9
        size = model_info(name).img_size
        x = torch.randn(batch, 3, size, size, device=dev)
        y = torch.randint(0, 1000, (batch,), device=dev)

        def timed(step):
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            return steps * batch / (time.perf_counter() - t)

        torch.manual_seed(0)
        model = create_model(name, num_classes=1000).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def plain_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        base = timed(plain_step)
        print(f"| {name} | plain torch, bf16 autocast, fused AdamW | {base:,.0f} | {3 * flops * base / peak:.1%} | 1.00x |", flush=True)
        del model, opt
        for stage in (0, 2):
            cfg = parse_config({"model": {"name": name, "num_classes": 1000}, "data": {"batch_size": batch},
                                "deepspeed": {"zero_stage": stage, "precision": "bf16"}, "cluster": {"use_gpu": True}})
            plan = TrainPlan(batch, 1, 1, batch, 1e-4, "", 10**6, 1000, 1000, 1000, 1, 0)
            torch.manual_seed(0)
            engine, _ = build_engine(cfg, plan, create_model(name, num_classes=1000))
            xb = x.to(torch.bfloat16)

            def ds_step():
                loss = F.cross_entropy(engine(xb).float(), y)
                engine.backward(loss)
                engine.step()

            rate = timed(ds_step)
            print(f"| {name} | vitray DeepSpeed engine, ZeRO-{stage}, bf16 | {rate:,.0f} | {3 * flops * rate / peak:.1%} | "
                  f"{rate / base:.2f}x |", flush=True)
            del engine
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch4_32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--deepspeed-gpu", action="store_true", help="GPU check without Ray: see deepspeed_gpu()")
    args = ap.parse_args()
    if args.deepspeed_gpu:
        deepspeed_gpu(["vit_small_patch16_224", "vit_base_patch16_224"], 128, 30)
        return
    import ray
    import torch

    from vitray.models.zoo import default_img_size

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="vitray-bench-train-"))
    shards = make_shards(work, args.images, default_img_size(args.model))
    print(f"machine: {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), ray {ray.__version__}; "
          f"model {args.model}, micro batch {args.batch}, fp32, AdamW; {args.images} PNG images in shards")
    base = plain_loop(args.model, args.batch, args.steps, warmup=3)
    print(f"plain torch loop: {base:.1f} img/s", flush=True)
    rows = [("plain torch loop, tensors in memory (baseline)", base, None, 1.0)]
    one = {}
    for stage in (0, 2):
        rate, wall = vitray_run(shards, str(work / "runs"), args.model, args.batch, args.steps, 1, stage, cores)
        one[stage] = rate
        rows.append((f"vitray, 1 worker x {cores} CPUs, ZeRO-{stage}, Ray Data from shards", rate, wall, rate / base))
        print(rows[-1], flush=True)
    rate, wall = vitray_run(shards, str(work / "runs"), args.model, args.batch, args.steps, 2, 2, max(1, cores // 2))
    rows.append((f"vitray, 2 workers x {max(1, cores // 2)} CPUs, ZeRO-2 (vs 1 worker ZeRO-2)", rate, wall, rate / one[2]))
    print("\n| configuration | train img/s | run wall s | ratio |")
    print("|---|---|---|---|")
    for name, rate, wall, ratio in rows:
        print(f"| {name} | {rate:,.1f} | {'' if wall is None else f'{wall:.0f}'} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
