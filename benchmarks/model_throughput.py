"""Model-only ceiling: forward (inference) and training-step images/s for the vitray zoo, and MFU on a GPU.

    python benchmarks/model_throughput.py                       # vitray zoo, CPU, fp32 and bf16 autocast
    python benchmarks/model_throughput.py --device cuda --models vit_small_patch16_224 vit_base_patch16_224 \
        --dtypes bf16 --batch-size 128

Training step = forward + cross-entropy + backward + AdamW step, on tensors already in memory: the figure the
data, training, serving and scoring pipelines are measured against. MFU = 3 x forward FLOPs/image x train
images/s / the card's bf16 matmul rate, measured in the same run (a large bf16 GEMM).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "platform"))
from vitray.models import VITRAY_MODELS, create_model, model_info  # noqa: E402
from vitray.models.zoo import default_img_size  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, min_iters: int, min_seconds: float) -> tuple[int, float]:
    sync(device)
    t0 = time.perf_counter()
    n = 0
    while n < min_iters or time.perf_counter() - t0 < min_seconds:
        fn()
        n += 1
    sync(device)
    return n, time.perf_counter() - t0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or platform.machine()


def matmul_tflops(device, dtype=torch.bfloat16, n=8192, seconds=3.0) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters, dt = timed(lambda: a @ b, device, 10, seconds)
    return 2 * n**3 * iters / dt / 1e12


def bench(name, device, dtype, batch, seconds, warmup):
    size = default_img_size(name)
    model = create_model(name, num_classes=1000).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    model.eval()

    def fwd():
        with torch.inference_mode(), torch.autocast(**amp):
            model(x)

    for _ in range(warmup):
        fwd()
    n, dt = timed(fwd, device, 3, seconds)
    fwd_ips = n * batch / dt

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step():
        with torch.autocast(**amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    n, dt = timed(step, device, 3, seconds)
    train_ips = n * batch / dt
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return size, fwd_ips, train_ips


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(VITRAY_MODELS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        machine = torch.cuda.get_device_name()
        peak = matmul_tflops(device)
        print(f"device: {machine}; measured bf16 matmul rate {peak:.1f} TFLOP/s (8192^3 GEMM)")
    else:
        machine = f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
        peak = None
        print(f"device: {machine}")
    print(f"torch {torch.__version__}, batch {args.batch_size}\n")
    head = f"{'model':<28} {'img':>4} {'dtype':>5} {'GFLOPs':>7} {'fwd img/s':>10} {'train img/s':>12} {'bf16/fp32 train':>16}"
    if peak:
        head += f" {'MFU':>6}"
    print(head)
    print("-" * len(head))
    for name in args.models:
        gflops = model_info(name).gflops
        base = None
        for dtype in args.dtypes:
            size, fwd_ips, train_ips = bench(name, device, dtype, args.batch_size, args.seconds, args.warmup)
            ratio = "" if base is None else f"{train_ips / base:.2f}x"
            base = train_ips if dtype == "fp32" else base
            line = f"{name:<28} {size:>4} {dtype:>5} {gflops:>7.2f} {fwd_ips:>10.1f} {train_ips:>12.1f} {ratio:>16}"
            if peak:
                line += f" {3 * gflops * 1e9 * train_ips / (peak * 1e12):>6.1%}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
