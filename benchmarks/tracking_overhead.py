"""What MLflow tracking costs a training run: the same short training with tracking on and off, in one run.

    python benchmarks/tracking_overhead.py                       # embedded sqlite store, the quickstart recipe
    python benchmarks/tracking_overhead.py --uri http://127.0.0.1:5000 --epochs 8 --repeats 3

The recipe is the quickstart's (digits, vit_pico_patch4_32, 2 workers, ZeRO-2) at the default logging settings
(train.log_every_steps 50 -> here every epoch's 12 steps, tracking.flush_interval_s 10, pictures at the end).
Runs alternate off/on on one Ray instance; the figure is the median over repeats of the *training time*: wall time
from the end of the first epoch to the end of the last one in <run>/metrics.jsonl (steady state: no Ray start, no
first-epoch warmup). Printed beside it: the time rank 0's training thread spent in the logger, and the end-to-end
wall time of each run including the driver's MLflow work (opening the run, logging + registering the model).
Goal: ratio on/off <= 1.02.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))


def training_seconds(run_dir: str) -> tuple[float, float]:
    """(steady-state training seconds, logger seconds on the training thread) from the run's metrics.jsonl."""
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time"] for r in records if r.get("event") == "epoch_end"]
    closed = [r for r in records if r.get("event") == "tracking_closed"]
    return ends[-1] - ends[0], (closed[0]["caller_seconds"] if closed else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--uri", default=None, help="tracking URI (default: a fresh embedded sqlite store)")
    args = ap.parse_args()

    from vitray.config import load_config
    from vitray.data.pack import pack
    from vitray.quickstart import quickstart_config_path
    from vitray.train import run_training
    from vitray.train.trainer import _local_cpus, init_ray

    root = Path(tempfile.mkdtemp(prefix="vitray-bench-tracking-"))
    os.environ["VITRAY_HOME"] = str(root / "home")
    shards = root / "shards"
    pack("-", str(shards), "sklearn-digits", val_fraction=0.1, progress=False)
    base = load_config(quickstart_config_path(), [f"data.path={shards}", f"train.epochs={args.epochs}",
                                                  f"cluster.storage_path={root / 'runs'}"])
    init_ray(None, _local_cpus(base))
    rows: dict[str, list[tuple[float, float, float]]] = {"off": [], "on": []}
    for rep in range(args.repeats):
        for mode in ("off", "on"):
            over = [f"tracking.enabled={'true' if mode == 'on' else 'false'}", f"cluster.run_name=bench-{mode}-{rep}"]
            if args.uri:
                over.append(f"tracking.uri={args.uri}")
            cfg = load_config(quickstart_config_path(), [f"data.path={shards}", f"train.epochs={args.epochs}",
                                                         f"cluster.storage_path={root / 'runs'}", *over])
            t0 = time.perf_counter()
            result = run_training(cfg)
            wall = time.perf_counter() - t0
            train_s, logger_s = training_seconds(result.run_dir)
            rows[mode].append((train_s, logger_s, wall))
            print(f"[bench] tracking {mode:<3} repeat {rep}: training {train_s:6.2f}s  logger on training thread "
                  f"{logger_s * 1000:6.1f} ms  end-to-end {wall:6.1f}s", flush=True)
    med = {m: statistics.median(r[0] for r in rows[m]) for m in rows}
    wall = {m: statistics.median(r[2] for r in rows[m]) for m in rows}
    logger_ms = statistics.median(r[1] for r in rows["on"]) * 1000
    print(f"\ntracking overhead, {args.epochs} epochs of the quickstart recipe, median of {args.repeats}, "
          f"store {args.uri or 'embedded sqlite'}")
    print(f"{'':<24} {'off':>9} {'on':>9} {'on/off':>7}")
    print(f"{'training (s)':<24} {med['off']:>9.2f} {med['on']:>9.2f} {med['on'] / med['off']:>7.3f}   goal <= 1.02")
    print(f"{'end-to-end (s)':<24} {wall['off']:>9.1f} {wall['on']:>9.1f} {wall['on'] / wall['off']:>7.3f}   "
          "(includes opening the MLflow run, logging + registering the model)")
    print(f"{'logger on train thread':<24} {'':>9} {logger_ms:>7.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
