"""The predictor's throughput (the forward path `vitray serve` and `vitray score` run per batch) against a plain
torch forward on the same device, in one run; and the CPU decode rate that must feed it.

    python benchmarks/inference_throughput.py                                   # CPU, ViT-Tiny/16, batch 64
    python benchmarks/inference_throughput.py --device cuda --arch vit_base_patch16_224 --batch-size 256

Rows (same exported model, random weights: timing does not depend on them; precision `auto`):
  plain forward       a normalised batch already on the device -> autocast forward (the upper bound)
  vitray predictor    uint8 crops on the host -> Predictor.probabilities_of_crops (copy uint8 to the device,
                      normalise there, forward, softmax, probabilities back on the host)
  host-normalised     the same but normalised to float32 on the host before the copy (vitray before this script)
  decode, one core    vitray's decode + resize + centre crop of 256x256 JPEGs in one process
Then: CPU cores per device to keep the predictor busy = predictor img/s / decode img/s per core; and the fp32 vs
bf16 agreement of the predictor on random images (same top-1, largest probability difference).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def timed(fn, seconds: float, sync) -> float:
    """Calls per second of fn over about `seconds` after 3 warm-up calls."""
    for _ in range(3):
        fn()
    sync()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    sync()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--decode-images", type=int, default=512)
    args = ap.parse_args()

    import numpy as np
    import torch

    from imagegen import encode, rgb
    from serve_throughput import make_export
    from vitray.predict import Predictor, normalise, prepare

    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        export = make_export(Path(tmp) / "export", args.arch)
        pred = Predictor.from_export(export, device=dev, precision="auto")
        fp32 = Predictor.from_export(export, device=dev, precision="fp32")
    size, meta, b = pred.input_size, pred.meta, args.batch_size
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (b, 3, size, size), dtype=np.uint8)
    on_device = normalise(crops, meta, dev)

    @torch.no_grad()
    def plain():
        with torch.autocast(dev.type, dtype=pred.dtype, enabled=pred.dtype != torch.float32):
            return pred.model(on_device)

    def host_normalised():
        return pred.probabilities_of_crops(normalise(crops, meta))  # float32 built on the host, then copied

    rows = [("plain forward", timed(plain, args.seconds, sync) * b),
            ("vitray predictor", timed(lambda: pred.probabilities_of_crops(crops), args.seconds, sync) * b),
            ("host-normalised", timed(host_normalised, args.seconds, sync) * b)]

    jpegs = [encode(rgb(i, size=(256, 256)), "JPEG", quality=90) for i in range(args.decode_images)]
    start = time.perf_counter()
    for j in jpegs:
        prepare(j, meta)
    decode = len(jpegs) / (time.perf_counter() - start)

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{args.arch} on {name}, batch {b}, precision auto -> {pred.precision}, torch {torch.__version__}")
    print(f"{'path':<20} {'img/s':>10} {'vs plain':>9}")
    for label, rate in rows:
        print(f"{label:<20} {rate:>10.1f} {rate / rows[0][1]:>8.2f}x")
    print(f"{'decode, one core':<20} {decode:>10.1f}   (256x256 JPEG -> {size} px crop)")
    print(f"CPU cores per device to keep the predictor busy: {rows[1][1] / decode:.1f}")
    a, f = pred.probabilities_of_crops(crops[:64]), fp32.probabilities_of_crops(crops[:64])
    print(f"{pred.precision} vs fp32 on 64 random images: same top-1 {np.mean(a.argmax(1) == f.argmax(1)):.3f}, "
          f"max |prob diff| {np.abs(a - f).max():.2e}")


if __name__ == "__main__":
    main()
