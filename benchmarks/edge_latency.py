"""Edge inference on this CPU: PyTorch eager against ONNX Runtime fp32 and int8 (`vitray export --format onnx
--int8`), in one run, on the same exported models.

    python benchmarks/edge_latency.py                       # digits ViT-Pico (trained here) + DeiT-Ti/S/B 224
    python benchmarks/edge_latency.py --arch deit_tiny_patch16_224 --seconds 10

Speed rows, per architecture (the model's forward on a normalised batch, CPU threads = this process's CPUs):
  torch fp32      PyTorch eager, float32 (the baseline)
  torch bf16      PyTorch eager under bf16 autocast: what vitray's torch runtime picks (`auto`) on a CPU with AMX
                  or AVX512-BF16; printed for reference
  onnx fp32       ONNX Runtime, CPU provider, the fp32 graph
  onnx int8       the int8 graph (MatMul/Gemm weights int8 per channel, activations quantized per batch)
columns: batch-1 latency p50/p99 (ms), images/s at batch 32 (median of interleaved rounds), model file size.
Accuracy, on the classifier trained here on scikit-learn's bundled digits (packed as `vitray data pack` does):
val top-1 of each runtime, int8 top-1 agreement with torch over every digit image, and the largest fp32
probability difference.
Goal (issue 21): int8 >= 2x torch fp32 images/s at batch 32, <= 0.3x its file size, agreement >= 99%, val top-1
within 1 point.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402


def latencies(fn, seconds: float, min_calls: int = 20, warmup: int = 3) -> np.ndarray:
    """Per-call seconds of fn over about ``seconds`` (at least ``min_calls``), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(out) < min_calls:
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return np.array(out)


def _random_export(folder: Path, name: str) -> Path:
    import torch

    from vitray.models import create_model
    from vitray.models.export import save_export
    from vitray.models.zoo import default_img_size

    torch.manual_seed(0)
    size = default_img_size(name)
    model = create_model(name, num_classes=1000)
    pre = {"img_size": size, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
           "interpolation": "bicubic"}
    return save_export(folder, model.state_dict(), model={"name": name, "num_classes": 1000, "img_size": size},
                       task="classification", class_names=[], preprocessing=pre)


def speed(label: str, src: Path, onnx: Path, seconds: float, batch: int, repeats: int) -> list[dict]:
    """Every runtime timed in turn, ``repeats`` rounds (interleaved, so a slower minute of a shared machine falls on
    all of them): batch-1 latency percentiles over every call, images/s at ``batch`` the median of the rounds."""
    import torch

    from vitray.models.export import load_export
    from vitray.onnx_runtime import OnnxModel

    model, meta = load_export(src)
    s = int(meta["preprocessing"]["img_size"])
    rng = np.random.default_rng(0)
    one, many = (rng.standard_normal((n, 3, s, s)).astype(np.float32) for n in (1, batch))
    t1, tb = torch.from_numpy(one), torch.from_numpy(many)

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    weights = (src / "model.safetensors").stat().st_size
    runtimes = {"torch fp32": (model, t1, tb, weights), "torch bf16": (bf16, t1, tb, weights)}
    for precision in ("fp32", "int8"):
        m = OnnxModel(onnx, precision)
        runtimes[f"onnx {precision}"] = (m, one, many, m.path.stat().st_size)
    lat: dict[str, list] = {k: [] for k in runtimes}
    ips: dict[str, list] = {k: [] for k in runtimes}
    with torch.no_grad():
        for _ in range(repeats):
            for name, (fn, x1, xb, _) in runtimes.items():
                lat[name].append(latencies(lambda: fn(x1), seconds / repeats / 2))
                ips[name].append(batch / float(np.median(latencies(lambda: fn(xb), seconds / repeats / 2, 2, 1))))
    rows = []
    for name, (_, _, _, size) in runtimes.items():
        ms = np.concatenate(lat[name]) * 1e3
        rows.append({"arch": label, "runtime": name, "p50": float(np.percentile(ms, 50)),
                     "p99": float(np.percentile(ms, 99)), "ips": float(np.median(ips[name])), "bytes": size})
    return rows


def accuracy(src: Path, onnx: Path, shards: str) -> dict:
    from digits_classifier import digit_rows

    from vitray.models.export import load_export
    from vitray.onnx_runtime import OnnxModel
    from vitray.predict import Predictor, export_metrics

    model, meta = load_export(src)
    top1 = {"torch": export_metrics(model, meta, shards)[0]["val/top1"]}
    for precision in ("fp32", "int8"):
        top1[precision] = export_metrics(OnnxModel(onnx, precision), meta, shards)[0]["val/top1"]
    images = [im for split in ("train", "val") for im, _ in digit_rows(shards, split)]
    want = Predictor.from_export(src, precision="fp32").probabilities(images)
    fp32 = Predictor.from_export(onnx, runtime="onnx").probabilities(images)
    int8 = Predictor.from_export(onnx, runtime="onnx", precision="int8").probabilities(images)
    return {"top1": top1, "images": len(images), "fp32_max_abs_diff": float(np.abs(fp32 - want).max()),
            "int8_agreement": float((int8.argmax(1) == want.argmax(1)).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", default=None,
                    help="random-weight architectures to time (default DeiT tiny, small, base at 224)")
    ap.add_argument("--seconds", type=float, default=8.0, help="per runtime and architecture, over every round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every runtime")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12, help="digits classifier training epochs")
    args = ap.parse_args()
    archs = args.arch or ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]

    import torch

    from digits_classifier import train_digits_classifier

    from vitray.data.pack import pack
    from vitray.onnx_export import export_onnx

    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(cpus)
    import platform as stdlib_platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), stdlib_platform.processor())
    print(f"[edge] {cpu}, {cpus} CPUs; torch {torch.__version__}, batch {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vitray-edge-") as tmp:
        root = Path(tmp)
        shards = str(root / "digits")
        pack("-", shards, "sklearn-digits", val_fraction=0.1, progress=False)
        t = time.time()
        src = train_digits_classifier(shards, root / "digits-torch", epochs=args.epochs)
        print(f"[edge] trained vit_pico_patch4_32 on the digits in {time.time() - t:.0f}s", flush=True)
        models = [("digits vit_pico_patch4_32", src)] + [(a, _random_export(root / f"{a}-torch", a)) for a in archs]
        rows, acc = [], None
        for label, folder in models:
            onnx = root / f"{folder.name}-onnx"
            result = export_onnx(str(folder), onnx, int8=True)
            print(f"[edge] {label}: {result.exporter} exporter, max |onnx - torch| {result.parity_max_abs_diff:.1e}",
                  flush=True)
            if acc is None:
                acc = accuracy(folder, onnx, shards)
            rows += speed(label, folder, onnx, args.seconds, args.batch_size, args.repeats)

    print(f"\n{'architecture':<28}{'runtime':<12}{'p50 ms':>9}{'p99 ms':>9}{'img/s@' + str(args.batch_size):>11}"
          f"{'MB':>8}{'x img/s':>9}{'x size':>8}")
    for r in rows:
        base = next(b for b in rows if b["arch"] == r["arch"] and b["runtime"] == "torch fp32")
        print(f"{r['arch']:<28}{r['runtime']:<12}{r['p50']:>9.2f}{r['p99']:>9.2f}{r['ips']:>11.1f}"
              f"{r['bytes'] / 1e6:>8.1f}{r['ips'] / base['ips']:>9.2f}{r['bytes'] / base['bytes']:>8.2f}")
    t1 = acc["top1"]
    print(f"\ndigits val top-1: torch {t1['torch']:.4f}, onnx fp32 {t1['fp32']:.4f}, onnx int8 {t1['int8']:.4f} "
          f"({(t1['int8'] - t1['torch']) * 100:+.2f} points); int8 top-1 agreement with torch "
          f"{acc['int8_agreement']:.2%} of {acc['images']} images; max |fp32 - torch| probability "
          f"{acc['fp32_max_abs_diff']:.1e}")
    for arch in dict.fromkeys(r["arch"] for r in rows):
        base = next(r for r in rows if r["arch"] == arch and r["runtime"] == "torch fp32")
        q = next(r for r in rows if r["arch"] == arch and r["runtime"] == "onnx int8")
        ok = q["ips"] >= 2 * base["ips"] and q["bytes"] <= 0.3 * base["bytes"]
        print(f"goal int8 >= 2x torch img/s and <= 0.3x size, {arch}: {q['ips'] / base['ips']:.2f}x, "
              f"{q['bytes'] / base['bytes']:.2f}x -> {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
