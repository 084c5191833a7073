"""Batch scoring with Ray Data: any number of images through one model version, each input unit written once.

The pipeline streams: read a unit (shard, Parquet file, tar, a run of image files) -> decode + resize on CPU tasks
-> predict in an actor pool (``map_batches`` with a callable class: the model loads once per actor; GPUs when
``use_gpu``) -> the driver gathers each unit's rows and writes ``part-<unit>.parquet`` through a temporary file
and an atomic rename once the unit is complete. A rerun into the same output skips the units already written, so an
interrupted job ends, after a rerun, with exactly one row per input id. Rows whose image cannot be read or decoded
are kept, with the reason in ``error`` and no prediction; a job whose rows are mostly errors fails. The prediction
columns are the model's task's (its inference head in ``vitray.tasks``).

The output folder also holds ``_job.json`` (the input's units and fingerprint, and the model version pinned at the
first run: a rerun finishes with the same version even if the alias moved) and ``_summary.json``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vitray import console, storage
from vitray.config import MAX_PIXELS

from .inputs import InputError, ScoreInput, Unit, discover, read_unit

__all__ = ["score", "ScoreSummary", "ScoreError", "output_schema", "JOB_FILE", "SUMMARY_FILE"]

JOB_FILE, SUMMARY_FILE = "_job.json", "_summary.json"
LOG_DIR = "_logs"  # the complete log of each run into this output (readers of the Parquet skip "_" names)


def output_schema(head, options: dict):
    """``id``, ``source``, the task's columns (its inference head's), ``model_uri``, ``model_version``, ``error``."""
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("source", pa.string()), *head.score_fields(options),
                      ("model_uri", pa.string()), ("model_version", pa.string()), ("error", pa.string())])


@dataclass
class ScoreSummary:
    output: str
    rows: int                # rows in the output (all units, this run and earlier ones)
    error_rows: int
    units: int
    units_skipped: int       # already complete from an earlier run
    rows_this_run: int
    seconds: float
    images_per_s: float      # rows_this_run / seconds of this run's pipeline
    model_uri: str
    model_version: str | None
    precision: str
    input_format: str
    input_fingerprint: str
    mlflow_run_id: str | None = None
    runtime: str = "torch"

    def line(self) -> str:
        how = self.precision if self.runtime == "torch" else f"{self.runtime} {self.precision}"
        return (f"[vitray] scored {self.rows_this_run:,} images in {self.seconds:.1f}s ({self.images_per_s:.1f} img/s, "
                f"{how}); output {self.rows:,} rows, {self.error_rows:,} error rows, {self.units} units "
                f"({self.units_skipped} already done) with {self.model_uri} version {self.model_version} -> "
                f"{self.output}")


# ---------------------------------------------------------------------------------------------- pipeline stages
def _read_units(batch: dict):
    """Ray Data stage: unit descriptors in (one per row), that unit's rows out, with their order inside the unit."""
    for raw in batch["unit"]:
        unit = Unit(**json.loads(raw))
        seq = 0
        for b in read_unit(unit):
            n = len(b["id"])
            yield {"unit": np.array([unit.key] * n, dtype=object), "seq": np.arange(seq, seq + n, dtype=np.int64),
                   "id": np.array(b["id"], dtype=object), "source": np.array(b["source"], dtype=object),
                   "image": np.array(b["image"], dtype=object),
                   # "" = no error: a column of only None would come out typed null and clash with later blocks
                   "read_error": np.array([e or "" for e in b["read_error"]], dtype=object)}
            seq += n


def _prepare(batch: dict, meta: dict, max_pixels: int) -> dict:
    """Ray Data stage (CPU tasks): decode + the task's eval transform; an image that cannot be decoded becomes an
    error row with a zero crop. Anything else (a bug) fails the job instead of turning every row into an error."""
    from vitray.data.decode import DecodeError
    from vitray.predict import InputError, prepare

    size = int(meta["preprocessing"]["img_size"])
    n = len(batch["id"])
    crops = np.zeros((n, 3, size, size), dtype=np.uint8)
    sizes = np.zeros((n, 2), dtype=np.int32)
    errors = [str(e) for e in batch["read_error"]]
    for i in range(n):
        if errors[i]:
            continue
        try:
            crops[i], sizes[i] = prepare(batch["image"][i], meta, max_pixels)
        except (DecodeError, InputError) as err:
            errors[i] = str(err)[:300] or type(err).__name__
    return {"unit": batch["unit"], "seq": batch["seq"], "id": batch["id"], "source": batch["source"], "crop": crops,
            "size": sizes, "error": np.array(errors, dtype=object)}


class Scorer:
    """Ray Data actor: loads the pinned model once, then scores crops batch by batch."""

    def __init__(self, model_uri: str, tracking_uri: str | None, precision: str, options: dict, use_gpu: bool):
        import tempfile

        import ray
        from vitray.predict import Predictor
        from vitray.tracking.uris import resolve_model_uri

        runtime = options.get("runtime", "torch")  # torch, or onnx (ONNX Runtime on CPU; torch is not imported)
        threads = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)))
        device = "cpu"
        if runtime == "torch":
            import torch

            torch.set_num_threads(threads)
            device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        with tempfile.TemporaryDirectory(prefix="vitray-score-") as tmp:  # weights are in memory once loaded
            folder = resolve_model_uri(model_uri, tracking_uri, dest=tmp, runtime=runtime)
            # precision auto: resolved on this device; outputs: the task's answers, or embeddings (vitray embed)
            self.predictor = Predictor.from_export(folder, runtime=runtime, threads=threads, device=device,
                                                   precision=precision, outputs=options.get("outputs", "task"))
        self.options = options

    def __call__(self, batch: dict) -> dict:
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        results = []
        if ok.any():
            results = self.predictor.predict_crops(batch["crop"][ok], [tuple(s) for s in batch["size"][ok]])
        outputs = self.predictor.head.score_outputs(results, ok, self.predictor.meta, self.options)
        return {"unit": batch["unit"], "seq": batch["seq"], "id": batch["id"], "source": batch["source"],
                "error": batch["error"], **outputs}


# ------------------------------------------------------------------------------------------------ the job
def _write_json(path: str, data: dict) -> None:
    storage.write_text(path, json.dumps(data, indent=1))


def prepare_output(output: str) -> str:
    """The output folder or object store prefix, created or checked writable (InputError otherwise)."""
    if storage.is_uri(output):
        storage.check(output, "--output", write=True)
        return output.rstrip("/")
    local = Path(output).expanduser()
    if local.exists() and not local.is_dir():
        raise InputError(f"output {output}: exists and is not a folder")
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


def done_units(out: str) -> set[str]:
    """The keys of the units already written. A unit being written when an earlier run died is never read and
    is cleared here."""
    if storage.is_uri(out):
        storage.delete_tmp(out)
    else:
        for stale in Path(out).glob(".part-*.tmp"):
            stale.unlink()
    return {storage.basename(f)[len("part-"):-len(".parquet")] for f in _parts(out)}


def start_ray(address: str | None, concurrency: int, cpus_per_actor: float) -> bool:
    """Connect to ``address`` or start a local Ray sized for the job (True: started here, shut down by the caller).
    The workers' output comes to the driver: into the job's log file (vitray.console), not the console."""
    import ray

    if ray.is_initialized():
        return False
    if address:  # object storage credentials and endpoint reach the workers (a local Ray inherits them)
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": storage.forwarded_env()})
        return False
    # a local Ray: the actors' threads and the read/decode tasks share the cores, as in training
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores + max(2, int(cpus_per_actor * concurrency)), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)
    return True


def write_units(batches, expected: dict[str, int], write, bar) -> int:
    """Regroup a stream of batches (rows of many units, in any order) by their ``unit`` column and ``write(key,
    chunks)`` each unit as soon as all its ``expected`` rows have arrived (its memory freed); the units still open
    when the stream ends are written then (``write`` checks they are complete). Returns the rows written."""
    parts: dict[str, list[dict]] = {}
    counts: dict[str, int] = {}
    written = seen = units_done = 0
    t_start = time.perf_counter()  # rows/s as the summary counts them: the actors' start-up included
    for batch in batches:
        for key in np.unique(batch["unit"]):
            sel = batch["unit"] == key
            parts.setdefault(key, []).append({k: v[sel] for k, v in batch.items() if k != "unit"})
            counts[key] = counts.get(key, 0) + int(sel.sum())
            if counts[key] >= expected[key]:  # complete: write it now, free the memory
                written += write(key, parts.pop(key))
                units_done += 1
        seen += len(batch["id"])
        rate = seen / max(time.perf_counter() - t_start, 1e-9)
        bar.update(seen, eta_s=(bar.total - seen) / max(rate, 1e-9),
                   **{"": f"{rate:.1f} img/s", "units": f"{units_done}/{len(expected)}"})
    for key, chunks in parts.items():  # the stream has ended: the rest must be complete too (checked)
        written += write(key, chunks)
    return written


def _parts(out: str) -> list[str]:
    """The complete units of an output (a local folder or an object store prefix), sorted."""
    return [p for p, _ in storage.list_files(out) if storage.basename(p).startswith("part-")
            and p.endswith(".parquet")]


def _job(out: str, inp: ScoreInput, pin: dict, overwrite: bool, outputs: str = "task", runtime: str = "torch") -> dict:
    """The job record of this output folder: created on the first run, checked on every rerun."""
    path = storage.join(out, JOB_FILE)
    if storage.is_file(path) and not overwrite:
        job = json.loads(storage.read_text(path))
        if job.get("runtime", "torch") != runtime:
            raise InputError(f"output {out} was started on the {job.get('runtime', 'torch')} runtime, not {runtime}: "
                             "finish it there, or use a new output folder or --overwrite")
        if job.get("outputs", "task") != outputs:
            what = {"task": "`vitray score` answers", "embedding": "`vitray embed` embeddings"}
            raise InputError(f"output {out} holds {what[job.get('outputs', 'task')]}, not {what[outputs]}; use a "
                             "new output folder or --overwrite")
        if job["input"]["fingerprint"] != inp.fingerprint:
            raise InputError(f"output {out} holds the scoring of another input ({job['input']['root']}, "
                             f"{job['input']['rows']:,} rows); use a new output folder or --overwrite")
        if job["model"]["uri"] != pin["uri"]:
            print(f"[vitray] {pin['source']} now points at {pin['uri']}; this output was started with "
                  f"{job['model']['uri']}, which finishes it (--overwrite to rescore with the new one)", flush=True)
        return job
    if overwrite:
        for f in _parts(out):
            storage.delete(f)
    job = {"input": inp.to_json(), "model": pin, "outputs": outputs, "runtime": runtime,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_json(path, job)
    return job


def _export_digest(folder: Path) -> str:
    """sha256 over an export folder's files: a local folder or runs:/ URI can change where a version cannot."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def _write_unit(out: str, key: str, parts: list[dict], expected: int, head, meta: dict, model: dict,
                schema) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(cols["seq"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    if not np.array_equal(cols["seq"], np.arange(expected)):  # never write a partial or doubled unit as done
        raise RuntimeError(f"unit {key}: read {len(cols['seq'])} rows, listed {expected}: the input changed while it "
                           "was being scored; check it and rerun (complete units are kept)")
    errors = [str(e) if e else None for e in cols["error"]]
    good = [e is None for e in errors]

    table = pa.table({
        "id": pa.array([str(x) for x in cols["id"]], pa.string()),
        "source": pa.array([str(x) for x in cols["source"]], pa.string()),
        **head.score_columns(cols, good, meta),
        "model_uri": pa.array([model["uri"]] * len(errors), pa.string()),
        "model_version": pa.array([model.get("version")] * len(errors), pa.string()),
        "error": pa.array(errors, pa.string()),
    }, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    # all or nothing under its name (a local rename after fsync, or an object store upload; vitray.storage): a
    # reader, or a rerun, never sees half a unit
    storage.write_bytes(storage.join(out, f"part-{key}.parquet"), sink.getvalue(), durable=True)
    return table.num_rows


def _read_errors(path: str):
    import pyarrow.parquet as pq

    with storage.open_input(path) as f:
        return pq.read_table(f, columns=["error"])


def _count_output(out: str) -> tuple[int, int]:
    import pyarrow.compute as pc

    rows = errors = 0
    for f in _parts(out):
        t = _read_errors(f)
        rows += t.num_rows
        errors += t.num_rows - int(pc.sum(pc.is_null(t.column("error"))).as_py() or 0)
    return rows, errors


def score(model_uri: str, input_path: str, output: str, *, batch_size: int = 64, concurrency: int = 1,
          use_gpu: bool = False, precision: str = "auto", top_k: int = 5, fmt: str = "auto",
          image_column: str | None = None, files_per_unit: int = 1024, cpus_per_actor: float = 1.0,
          max_pixels: int = MAX_PIXELS, tracking_cfg=None, overwrite: bool = False,
          address: str | None = None, resource_wait_s: float = 0.0, stall_timeout_s: float = 300.0,
          outputs: str = "task", runtime: str = "torch") -> ScoreSummary:
    """Score ``input_path`` with ``model_uri`` into ``output`` (see the module docstring). Input and model problems
    raise :class:`InputError` / ``ModelUriError`` (exit 2) before Ray starts. ``outputs="embedding"``: the pooled
    features of the model's encoder instead of its task's answers (``vitray embed``). ``runtime="onnx"``: the
    model's ONNX export on ONNX Runtime's CPU provider (the same columns)."""
    import tempfile

    from vitray.config import TrackingConfig
    from vitray.export_format import read_export_meta
    from vitray.predict import resolve_precision
    from vitray.tracking.uris import default_tracking_uri, pin_model_uri, resolve_model_uri

    tracking_cfg = tracking_cfg or TrackingConfig()
    tracking_uri = default_tracking_uri(tracking_cfg.uri)
    if outputs == "task" and _takes_prompts(model_uri, tracking_uri):  # a generator: prompts in, images out
        from vitray.batch.prompts import score_prompts

        return score_prompts(model_uri, input_path, output, batch_size=batch_size, concurrency=concurrency,
                             use_gpu=use_gpu, cpus_per_actor=cpus_per_actor, tracking_cfg=tracking_cfg,
                             overwrite=overwrite, address=address, stall_timeout_s=stall_timeout_s)
    inp = discover(input_path, fmt, image_column=image_column, files_per_unit=files_per_unit)
    out = prepare_output(output)
    with console.log_to(storage.join(out, LOG_DIR, f"score-{time.strftime('%Y%m%d-%H%M%S')}.log")) as log_path:
        job = _job(out, inp, pin_model_uri(model_uri, tracking_uri), overwrite, outputs, runtime)
        pin = job["model"]
        with tempfile.TemporaryDirectory(prefix="vitray-score-meta-") as tmp:
            folder = resolve_model_uri(pin["uri"], tracking_uri, dest=tmp, runtime=runtime)
            meta, digest = read_export_meta(folder), _export_digest(folder)
        if not pin.get("digest"):  # first run: the weights this output is scored with
            pin["digest"] = digest
            _write_json(storage.join(out, JOB_FILE), job)
        elif pin["digest"] != digest:
            raise InputError(f"model {pin['uri']} is not the model this output was started with (its files changed); "
                             "use a new output folder or --overwrite")
        from vitray.tasks import TaskError, get_task

        try:
            head = get_task(meta["task"], "infer").load("infer")  # the task's columns and answers
        except TaskError as err:
            raise InputError(f"model {model_uri}: {err}") from None
        if getattr(head, "inputs", "image") != "image":
            raise InputError(f"model {model_uri}: a {meta['task']} model takes {head.inputs}s, not images (it has no "
                             "embeddings; `vitray score` draws an image per prompt row)")
        if outputs == "embedding":
            from vitray.tasks.embedding import EmbeddingHead, embedding_head_of

            if runtime == "onnx" and not isinstance(head, EmbeddingHead):
                raise InputError(f"model {model_uri}: embeddings of a {meta['task']} model need the torch runtime "
                                 "(its ONNX graph ends at the task's outputs)")
            head = embedding_head_of(head)
        options = {"top_k": top_k, "outputs": outputs, "runtime": runtime}
        # on GPUs "auto" is resolved by each actor on its own device (the driver may have no GPU)
        device_precision = (precision if use_gpu and precision == "auto"
                            else resolve_precision(precision, "cpu", runtime))
        done = done_units(out)
        pending = [u for u in inp.units if u.key not in done]
        print(f"[vitray] scoring {inp.rows:,} images in {len(inp.units)} units from {inp.root} ({inp.format}); "
              f"{len(inp.units) - len(pending)} units already done; model {pin['uri']} ({device_precision})", flush=True)

        t0 = time.time()
        rows_now = 0
        if pending:
            rows_now = _run_pipeline(pending, pin, meta, tracking_uri, out, batch_size=batch_size, concurrency=concurrency,
                                     use_gpu=use_gpu, precision=device_precision, head=head, options=options,
                                     cpus_per_actor=cpus_per_actor, max_pixels=max_pixels, address=address,
                                     resource_wait_s=resource_wait_s, stall_timeout_s=stall_timeout_s)
        seconds = time.time() - t0
        rows, errors = _count_output(out)
        summary = ScoreSummary(out, rows, errors, len(inp.units), len(inp.units) - len(pending), rows_now,
                               round(seconds, 2), round(rows_now / seconds, 2) if rows_now and seconds > 0 else 0.0,
                               pin["source"], pin.get("version"), device_precision, inp.format, inp.fingerprint,
                               runtime=runtime)
        if rows != inp.rows:
            raise RuntimeError(f"output {out} has {rows:,} rows for {inp.rows:,} inputs: rerun to finish the missing units")
        print(summary.line(), flush=True)
        if log_path is not None:
            print(f"[vitray] log of this job: {log_path}", flush=True)  # before the upload: the log names itself
        summary.mlflow_run_id = _track(summary, tracking_cfg, tracking_uri, batch_size, concurrency, top_k, log_path)
        _write_json(storage.join(out, SUMMARY_FILE), asdict(summary))
        if rows and errors > rows * MAX_ERROR_SHARE:
            raise ScoreError(f"{errors:,} of {rows:,} rows are errors (e.g. {_first_error(out)}): the input is not "
                             f"what this model reads; the rows are in {out}")
        return summary


def _takes_prompts(model_uri: str, tracking_uri: str) -> bool:
    """The model's task reads prompts (a generator), from its export's meta."""
    import tempfile

    from vitray.export_format import read_export_meta
    from vitray.tasks import TASKS
    from vitray.tracking.uris import resolve_model_uri

    try:
        with tempfile.TemporaryDirectory(prefix="vitray-score-task-") as tmp:
            task = read_export_meta(resolve_model_uri(model_uri, tracking_uri, dest=tmp))["task"]
    except Exception:  # noqa: BLE001 - not a model it can read: the scoring path checks its input, then says why
        return False
    return task in TASKS and TASKS[task].inputs == "prompt"


MAX_ERROR_SHARE = 0.5  # a job whose output is mostly error rows fails (exit 1) instead of looking done


class ScoreError(RuntimeError):
    """The job ran but its output is not usable (most rows are errors)."""


def _first_error(out: str) -> str:
    import pyarrow.compute as pc

    for f in _parts(out):
        errors = pc.drop_null(_read_errors(f).column("error"))
        if len(errors):
            return str(errors[0])[:200]
    return "?"


def _run_pipeline(pending: list[Unit], pin: dict, meta: dict, tracking_uri: str, out: str, *, batch_size: int,
                  concurrency: int, use_gpu: bool, precision: str, head, options: dict, cpus_per_actor: float,
                  max_pixels: int, address: str | None, resource_wait_s: float = 0.0,
                  stall_timeout_s: float = 300.0) -> int:
    import ray
    import ray.data

    from vitray.capacity import ensure_capacity, plan_resources
    from vitray.watchdog import watched

    started = False
    ctx = saved_order = saved_bars = None
    started = start_ray(address, concurrency, cpus_per_actor)
    bar = None
    try:
        # the predictor actors hold their CPUs for the whole job; the read/decode tasks need at least one more
        what = f"{concurrency} predictor actor{'s' if concurrency > 1 else ''} x {cpus_per_actor:g} CPU" + (
            " + 1 GPU" if use_gpu else "")
        plan = plan_resources("score", what, concurrency * cpus_per_actor, concurrency if use_gpu else 0.0,
                              fields=["score.concurrency", "score.cpus_per_actor"], grow_wait_s=resource_wait_s)
        print(plan.line(), flush=True)
        ensure_capacity(plan)
        ctx = ray.data.DataContext.get_current()
        saved_order, saved_bars = ctx.execution_options.preserve_order, ctx.enable_progress_bars
        ctx.execution_options.preserve_order = False  # units are regrouped by the driver: any order will do
        ctx.enable_progress_bars = console.verbose()  # one vitray progress display instead of Ray Data's bars
        ds = ray.data.from_items([{"unit": json.dumps(asdict(u))} for u in pending], override_num_blocks=len(pending))
        # read + decode run as CPU tasks (fused with each other); their remote args differ from the predictor's
        # (max_calls=0, which is Ray's default for a task: no limit), so Ray Data does not fuse them into the
        # actors, where decoding would serialise with the forward instead of overlapping it
        ds = ds.map_batches(_read_units, batch_size=1, max_calls=0)
        ds = ds.map_batches(_prepare, batch_size=batch_size, max_calls=0,
                            fn_kwargs={"meta": meta, "max_pixels": max_pixels})
        ds = ds.map_batches(Scorer, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=concurrency),
                            num_gpus=1 if use_gpu else 0, num_cpus=cpus_per_actor,
                            fn_constructor_kwargs={"model_uri": pin["uri"], "tracking_uri": tracking_uri,
                                                   "precision": precision, "options": options, "use_gpu": use_gpu})
        schema = output_schema(head, options)
        expected = {u.key: u.rows for u in pending}
        bar = console.progress("score", total=sum(expected.values()), unit="images")
        batches = ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
        return write_units(watched(batches, stall_timeout_s, what="prediction batch",
                                   fields="score.concurrency or score.cpus_per_actor"), expected,
                           lambda key, chunks: _write_unit(out, key, chunks, expected[key], head, meta, pin, schema),
                           bar)
    finally:
        if bar is not None:
            bar.close()
        if ctx is not None:
            ctx.execution_options.preserve_order = saved_order
            ctx.enable_progress_bars = saved_bars
        if started:
            ray.shutdown()


def _track(summary: ScoreSummary, tracking_cfg, tracking_uri: str, batch_size: int, concurrency: int,
           top_k: int, log_path: str | None = None) -> str | None:
    """An MLflow run recording which model version scored which data; a tracking failure is a warning."""
    if not tracking_cfg.enabled:
        return None
    try:
        from mlflow.entities import Metric, Param, RunTag

        from vitray.tracking.runs import check_reachable, ensure_experiment
        from vitray.tracking.uris import client_for

        check_reachable(tracking_uri, tracking_cfg.connect_timeout_s)
        client = client_for(tracking_uri)
        exp = ensure_experiment(client, tracking_cfg.experiment, tracking_uri, tracking_cfg.artifact_location)
        run = client.create_run(exp, run_name=f"score-{storage.basename(summary.output)}", tags={
            "vitray.source": "vitray score", "vitray.model_uri": summary.model_uri,
            "vitray.model_version": str(summary.model_version), "vitray.input_fingerprint": summary.input_fingerprint,
            "vitray.output": summary.output})
        now = int(time.time() * 1000)
        params = {"model_uri": summary.model_uri, "model_version": summary.model_version, "precision": summary.precision,
                  "runtime": summary.runtime,
                  "input_format": summary.input_format, "batch_size": batch_size, "concurrency": concurrency,
                  "top_k": top_k}
        metrics = {"score/rows": summary.rows, "score/error_rows": summary.error_rows,
                   "score/rows_this_run": summary.rows_this_run, "score/images_per_s": summary.images_per_s,
                   "score/seconds": summary.seconds}
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("vitray.units", str(summary.units))])
        client.log_dict(run.info.run_id, asdict(summary), "score_summary.json")
        if console.local_log(log_path) is not None:
            console.drain()
            client.log_artifact(run.info.run_id, str(console.local_log(log_path)), "logs")
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id
    except Exception as err:  # noqa: BLE001 - the predictions are on disk either way
        print(f"[vitray] warning: scoring not recorded in MLflow at {tracking_uri}: {str(err).splitlines()[0][:200]}",
              flush=True)
        return None
