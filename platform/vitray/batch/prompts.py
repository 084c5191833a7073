"""Batch generation: ``vitray score --model GENERATOR --input PROMPTS --output DIR`` draws one image per prompt row,
with `vitray score`'s guarantees (what it does for images, this does for prompts):

* input: a Parquet or CSV file of prompts, or a folder of them (local or an object store): a ``prompt`` column, and
  optionally ``id`` (default ``FILE:ROW``) and ``seed`` (default: the row's index in its file, so a rerun draws the
  same image);
* units of ``rows_per_unit`` consecutive rows of one file, each written as ``part-<file>-<first row>.parquet`` in one
  atomic write (a local rename after fsync, or an object store upload): a killed job leaves whole units only, and a
  rerun skips the units already written, so every id appears exactly once;
* a job record (``_vitray_score.json``) pins the input's fingerprint and the model version and files: a rerun with
  another input or changed weights is refused;
* Ray Data: reading prompts runs as CPU tasks, sampling in an actor pool of generators (``concurrency`` actors, a
  GPU each with ``use_gpu``), each batch padded to the same width (an image depends on its prompt and seed only);
* output columns: ``id``, ``prompt``, ``seed``, ``image`` (PNG bytes), ``width``, ``height``, ``model_uri``,
  ``model_version``, ``error`` (a row that cannot be drawn, such as an empty prompt, keeps its id with the reason).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass

import numpy as np

from vitray import console, storage
from vitray.batch.inputs import InputError, _safe_key, _stat_digest

__all__ = ["score_prompts", "discover_prompts", "PromptUnit", "ROWS_PER_UNIT"]

ROWS_PER_UNIT = 256
PROMPT_EXTS = (".parquet", ".csv")


@dataclass
class PromptUnit:
    key: str
    path: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def _read_table(path: str):
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    with storage.open_input(path) as f:
        return pcsv.read_csv(f) if path.lower().endswith(".csv") else pq.read_table(f)


def discover_prompts(path: str, rows_per_unit: int = ROWS_PER_UNIT) -> tuple[list[PromptUnit], str]:
    """The units of a prompt file or folder, and the input's fingerprint. A file without a ``prompt`` column, or
    an input with no prompt files, is an :class:`InputError` naming it."""
    if storage.is_file(path):
        files = [path]
    elif storage.is_dir(path):
        files = sorted(p for p, _ in storage.list_files(path) if p.lower().endswith(PROMPT_EXTS)
                       and not storage.basename(p).startswith(("_", ".")))
    else:
        raise InputError(f"--input {path}: not found")
    if not files:
        raise InputError(f"--input {path}: no .parquet or .csv files of prompts")
    units = []
    for f in files:
        table = _read_table(f)
        if "prompt" not in table.column_names:
            raise InputError(f"--input {f}: no 'prompt' column (it has: {', '.join(table.column_names[:10])})")
        stem = _safe_key(storage.basename(f).rsplit(".", 1)[0])
        for start in range(0, table.num_rows, rows_per_unit):
            units.append(PromptUnit(f"{stem}-{start:09d}", f, start, min(table.num_rows, start + rows_per_unit)))
    if len({u.key for u in units}) != len(units):
        raise InputError(f"--input {path}: two prompt files share a name")
    listing = json.dumps([[u.key, storage.basename(u.path), u.start, u.stop] for u in units])
    return units, hashlib.sha256((listing + _stat_digest(files)).encode()).hexdigest()


# ------------------------------------------------------------------------------------------- pipeline stages
def _read_prompts(batch: dict) -> dict:
    """One unit (a JSON row) -> its prompt rows: unit, seq, id, prompt, seed."""
    out = {k: [] for k in ("unit", "seq", "id", "prompt", "seed")}
    for raw in batch["unit"]:
        u = PromptUnit(**json.loads(raw))
        table = _read_table(u.path).slice(u.start, u.rows)
        cols = table.column_names
        prompts = ["" if p is None else str(p) for p in table.column("prompt").to_pylist()]
        ids = [str(x) for x in table.column("id").to_pylist()] if "id" in cols else \
            [f"{storage.basename(u.path)}:{u.start + i}" for i in range(u.rows)]
        seeds = [int(x) for x in table.column("seed").to_pylist()] if "seed" in cols else \
            list(range(u.start, u.stop))
        out["unit"] += [u.key] * u.rows
        out["seq"] += list(range(u.rows))
        out["id"] += ids
        out["prompt"] += prompts
        out["seed"] += seeds
    return {"unit": np.asarray(out["unit"], dtype=object), "seq": np.asarray(out["seq"], dtype=np.int64),
            "id": np.asarray(out["id"], dtype=object), "prompt": np.asarray(out["prompt"], dtype=object),
            "seed": np.asarray(out["seed"], dtype=np.int64)}


class PromptGenerator:
    """A Ray Data actor: one generator, loaded once, drawing every prompt of a batch."""

    def __init__(self, model_uri: str, tracking_uri: str | None, use_gpu: bool, width: int):
        import tempfile

        import torch

        from vitray.tasks.generation.generator import Generator
        from vitray.tracking.uris import resolve_model_uri

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self._tmp = tempfile.TemporaryDirectory(prefix="vitray-generate-")
        self.gen = Generator(resolve_model_uri(model_uri, tracking_uri, dest=self._tmp.name), device=device,
                             width=width)

    def __call__(self, batch: dict) -> dict:
        from vitray.tasks.generation.generator import GenerateError, png_bytes

        n = len(batch["prompt"])
        images = np.full(n, b"", dtype=object)
        errors = np.full(n, "", dtype=object)  # "": drawn (an all-None column would come back as NaN)
        good = []
        for i, p in enumerate(batch["prompt"]):
            try:
                self.gen.check(str(p), None, None)
                good.append(i)
            except GenerateError as err:
                errors[i] = str(err)
        if good:
            drawn = self.gen.generate([str(batch["prompt"][i]) for i in good], [int(batch["seed"][i]) for i in good])
            for i, im in zip(good, drawn):
                images[i] = png_bytes(im)
        side = self.gen.input_size
        return {**batch, "image": images, "error": errors, "side": np.full(n, side, dtype=np.int32)}


def _write_unit(out: str, key: str, parts: list[dict], expected: int, pin: dict) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["seq"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    if not np.array_equal(cols["seq"], np.arange(expected)):
        raise RuntimeError(f"unit {key}: {len(cols['seq'])} rows drawn, {expected} listed: the input changed while "
                           "it was being generated; check it and rerun (complete units are kept)")
    errors = [None if e is None or (isinstance(e, float) and e != e) or e == "" else str(e) for e in cols["error"]]
    good = [e is None for e in errors]
    n = len(good)
    table = pa.table({
        "id": pa.array([str(x) for x in cols["id"]], pa.string()),
        "prompt": pa.array([str(x) for x in cols["prompt"]], pa.string()),
        "seed": pa.array([int(x) for x in cols["seed"]], pa.int64()),
        "image": pa.array([x if g else None for x, g in zip(cols["image"], good)], pa.binary()),
        "width": pa.array([int(s) if g else None for s, g in zip(cols["side"], good)], pa.int32()),
        "height": pa.array([int(s) if g else None for s, g in zip(cols["side"], good)], pa.int32()),
        "model_uri": pa.array([pin["uri"]] * n, pa.string()),
        "model_version": pa.array([pin.get("version")] * n, pa.string()),
        "error": pa.array(errors, pa.string()),
    })
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(storage.join(out, f"part-{key}.parquet"), sink.getvalue(), durable=True)
    return n


def score_prompts(model_uri: str, input_path: str, output: str, *, batch_size: int = 16, concurrency: int = 1,
                  use_gpu: bool = False, cpus_per_actor: float = 1.0, tracking_cfg=None, overwrite: bool = False,
                  address: str | None = None, stall_timeout_s: float = 300.0, rows_per_unit: int = ROWS_PER_UNIT):
    """Draw an image for every prompt row of ``input_path`` into ``output`` (see the module docstring); returns the
    :class:`vitray.batch.score.ScoreSummary` (images = prompts)."""
    import tempfile

    import ray

    from vitray.batch.score import JOB_FILE, LOG_DIR, SUMMARY_FILE, ScoreSummary, _count_output, _export_digest, \
        _parts, _track, _write_json, done_units, prepare_output, start_ray, write_units
    from vitray.config import TrackingConfig
    from vitray.tracking.uris import default_tracking_uri, pin_model_uri, resolve_model_uri
    from vitray.watchdog import watched

    tracking_cfg = tracking_cfg or TrackingConfig()
    tracking_uri = default_tracking_uri(tracking_cfg.uri)
    units, fingerprint = discover_prompts(input_path, rows_per_unit)
    total = sum(u.rows for u in units)
    out = prepare_output(output)
    with console.log_to(storage.join(out, LOG_DIR, f"generate-{time.strftime('%Y%m%d-%H%M%S')}.log")) as log_path:
        pin = pin_model_uri(model_uri, tracking_uri)
        with tempfile.TemporaryDirectory(prefix="vitray-generate-meta-") as tmp:
            folder = resolve_model_uri(pin["uri"], tracking_uri, dest=tmp)
            digest = _export_digest(folder)
        job_path = storage.join(out, JOB_FILE)
        if storage.is_file(job_path) and not overwrite:
            job = json.loads(storage.read_text(job_path))
            if job.get("outputs") != "generation" or job["input"]["fingerprint"] != fingerprint:
                raise InputError(f"output {out} holds another job ({job['input'].get('root')}); use a new output "
                                 "folder or --overwrite")
            if job["model"].get("digest") != digest:
                raise InputError(f"model {pin['uri']} is not the model this output was started with (its files "
                                 "changed); use a new output folder or --overwrite")
            pin = job["model"]
        else:
            if overwrite:
                for f in _parts(out):
                    storage.delete(f)
            job = {"input": {"root": input_path, "rows": total, "fingerprint": fingerprint, "format": "prompts"},
                   "model": {**pin, "digest": digest}, "outputs": "generation", "runtime": "torch",
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            _write_json(job_path, job)
            pin = job["model"]
        done = done_units(out)
        pending = [u for u in units if u.key not in done]
        print(f"[vitray] generating {total:,} images for the prompts of {input_path} in {len(units)} units; "
              f"{len(units) - len(pending)} units already done; model {pin['uri']}", flush=True)
        t0 = time.time()
        rows_now = 0
        if pending:
            started = start_ray(address, concurrency, cpus_per_actor)
            bar = console.progress("generate", total=sum(u.rows for u in pending), unit="images")
            try:
                import ray.data

                ds = ray.data.from_items([{"unit": json.dumps(asdict(u))} for u in pending],
                                         override_num_blocks=len(pending))
                ds = ds.map_batches(_read_prompts, batch_size=1, max_calls=0)
                ds = ds.map_batches(PromptGenerator, batch_size=batch_size,
                                    compute=ray.data.ActorPoolStrategy(size=concurrency),
                                    num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor,
                                    fn_constructor_kwargs={"model_uri": pin["uri"], "tracking_uri": tracking_uri,
                                                           "use_gpu": use_gpu, "width": batch_size})
                expected = {u.key: u.rows for u in pending}
                batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
                rows_now = write_units(watched(batches, stall_timeout_s, what="generation batch",
                                               fields="score.concurrency or score.cpus_per_actor"), expected,
                                       lambda key, chunks: _write_unit(out, key, chunks, expected[key], pin), bar)
            finally:
                bar.close()
                if started:
                    ray.shutdown()
        seconds = time.time() - t0
        rows, errors = _count_output(out)
        summary = ScoreSummary(out, rows, errors, len(units), len(units) - len(pending), rows_now, round(seconds, 2),
                               round(rows_now / seconds, 2) if rows_now and seconds > 0 else 0.0, pin["source"],
                               pin.get("version"), "fp32", "prompts", fingerprint)
        if rows != total:
            raise RuntimeError(f"output {out} has {rows:,} rows for {total:,} prompts: rerun to finish the missing "
                               "units")
        print(f"[vitray] generated {rows_now:,} images in {seconds:.1f}s ({summary.images_per_s:.2f} img/s); output "
              f"{rows:,} rows, {errors:,} error rows, {len(units)} units ({summary.units_skipped} already done) with "
              f"{pin['source']} version {pin.get('version')} -> {out}", flush=True)
        if log_path is not None:
            print(f"[vitray] log of this job: {log_path}", flush=True)
        summary.mlflow_run_id = _track(summary, tracking_cfg, tracking_uri, batch_size, concurrency, 0, log_path)
        _write_json(storage.join(out, SUMMARY_FILE), asdict(summary))
        return summary
