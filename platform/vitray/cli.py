"""The ``vitray`` command line.

Exit codes: 0 success, 2 bad usage or config (the message names the field or file), 1 runtime failure.
Heavy imports (torch, ray) happen inside the command that needs them, so ``vitray --help`` stays instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from vitray.config import MAX_PIXELS
from vitray.console import VERBOSE_ENV

__all__ = ["main", "UsageError"]


class UsageError(Exception):
    """Bad usage or input the user can fix: printed as one line, exit code 2."""


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", metavar="CONFIG.yaml", nargs=None if required else "?", help="run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.epochs=3 (repeatable)")


def _load(args, *, check: bool = True):
    from vitray.config import check_config, load_config

    cfg = load_config(args.config, args.overrides)
    return check_config(cfg) if check else cfg


# ----------------------------------------------------------------------------------------------- commands
def cmd_config(args) -> int:
    from vitray.config import dump_config

    cfg = _load(args, check=not args.no_check)
    text = dump_config(cfg, args.output)
    if args.output:
        print(f"resolved config written to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def cmd_models_zoo(args) -> int:
    from vitray.models import VITRAY_MODELS, list_zoo, model_info

    names = [n for n in list_zoo() if not args.vitray_only or n in VITRAY_MODELS]
    if args.filter:
        wanted = [w for w in args.filter.split(",") if w]
        names = [n for n in names if any(w in n for w in wanted)]
    header = f"{'name':<36} {'img':>4} {'patch':>5} {'dim':>5} {'depth':>5} {'params(M)':>10} {'GFLOPs':>8} {'GMACs':>7}  source"
    print(header)
    print("-" * len(header))
    for name in names:
        info = model_info(name)
        src = "vitray" if name in VITRAY_MODELS else "timm"
        print(f"{name:<36} {info.img_size:>4} {info.patch_size:>5} {info.embed_dim:>5} {info.depth:>5} "
              f"{info.params / 1e6:>10.2f} {info.gflops:>8.2f} {info.gmacs:>7.2f}  {src}")
    print(f"\n{len(names)} models; GFLOPs = forward FLOPs per image at the default size (a multiply-add counts 2, "
          "so GMACs = GFLOPs / 2, the figure timm and the ViT/DeiT papers quote)")
    return 0


def _with_flags(section, name: str, flags: dict):
    """``section`` with the command-line flags that were given (not None) over it, validated as a whole (a runtime
    and a precision given together are checked together); a bad combination is a usage error naming the fields."""
    from pydantic import ValidationError

    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return section
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as err:
        parts = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"])
            prefix = f"{name}.{where}: " if where else f"{name}: "
            parts.append(prefix + e["msg"].removeprefix("Value error, "))
        raise UsageError("; ".join(parts)) from None


def _tracking_cfg(args, base: dict | None = None):
    """The ``tracking`` section: the export's own (its config.yaml) as the base, command-line flags over it; an
    explicit $MLFLOW_TRACKING_URI wins over the URI recorded in the export."""
    import os

    from vitray.config import TrackingConfig

    from pydantic import ValidationError

    fields = {k: v for k, v in (base or {}).items() if k in TrackingConfig.model_fields}  # older exports: known keys
    if os.environ.get("MLFLOW_TRACKING_URI"):
        fields["uri"] = None
    for key in ("tracking_uri", "experiment", "promotion_metric", "promotion_mode", "name"):
        if getattr(args, key, None):
            fields[{"tracking_uri": "uri", "name": "registered_model"}.get(key, key)] = getattr(args, key)
    try:
        return TrackingConfig(**fields)
    except ValidationError as err:
        first = err.errors()[0]
        raise UsageError(f"tracking.{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None


def _registry_client(args):
    from vitray.tracking import check_reachable, default_tracking_uri
    from vitray.tracking.uris import client_for

    uri = default_tracking_uri(args.tracking_uri)
    check_reachable(uri)
    return client_for(uri), uri


def _when(ms) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _registry_call(fn, what: str):
    from mlflow.exceptions import MlflowException

    try:
        return fn()
    except MlflowException as err:
        if getattr(err, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UsageError(f"{what}: {str(err).splitlines()[0][:300]}") from None
        raise


def cmd_models_list(args) -> int:
    from vitray.tracking.registry import list_models

    client, uri = _registry_client(args)
    rows = list_models(client)
    if not rows:
        print(f"no registered models at {uri}")
        return 0
    print(f"{'name':<32} {'versions':>8}  {'champion':>8}  {'challenger':>10}  {'latest':>6}  updated")
    for r in rows:
        al = r["aliases"]
        print(f"{r['name']:<32} {r['versions']:>8}  {('v' + al['champion']) if 'champion' in al else '-':>8}  "
              f"{('v' + al['challenger']) if 'challenger' in al else '-':>10}  v{r['latest'] or '-':<5}  {_when(r['updated'])}")
    print(f"\n{len(rows)} registered model(s) at {uri}")
    return 0


def cmd_models_show(args) -> int:
    from vitray.tracking.registry import model_versions

    client, uri = _registry_client(args)
    _registry_call(lambda: client.get_registered_model(args.name), f"registered model {args.name!r} at {uri}")
    rows = model_versions(client, args.name)
    metric = args.metric
    print(f"{args.name} at {uri}")
    print(f"{'version':>7}  {'aliases':<22} {metric:>10}  {'run':<32}  {'created':<16}  gate")
    for r in rows:
        value = r["metrics"].get(metric)
        shown = f"{float(value):.4f}" if value not in (None, "") else "-"
        print(f"{r['version']:>7}  {','.join(r['aliases']) or '-':<22} {shown:>10}  {r['run_id'] or '-':<32}  "
              f"{_when(r['created']):<16}  {r['gate']}")
    print(f"\nload one with: models:/{args.name}@champion  or  models:/{args.name}/VERSION")
    return 0


def cmd_models_promote(args) -> int:
    from vitray.tracking.registry import set_alias

    client, uri = _registry_client(args)
    before = _registry_call(lambda: set_alias(client, args.name, str(args.version), args.alias),
                            f"{args.name} v{args.version} at {uri}")
    print(f"{args.name}@{args.alias} -> v{args.version}" + (f" (was v{before})" if before else " (new alias)"))
    return 0


def cmd_models_register(args) -> int:
    from vitray.models.export import ExportError, read_export_meta
    from vitray.tracking.registry import log_and_register

    base = None
    if "://" not in args.export_dir:
        try:
            read_export_meta(args.export_dir)
        except ExportError as err:
            raise UsageError(str(err)) from None
        saved = Path(args.export_dir).expanduser() / "config.yaml"
        if saved.is_file():  # the training run's own tracking section: its registered name, metric, server
            import yaml

            base = (yaml.safe_load(saved.read_text()) or {}).get("tracking")
    cfg = _tracking_cfg(args, base)
    if not cfg.registered_model:
        raise UsageError(f"{args.export_dir}: no registered model name: pass --name NAME")
    reg = log_and_register(args.export_dir, cfg)
    print(f"logged {args.export_dir} as MLflow model {reg.model_uri} in run {reg.run_id}")
    print(f"registered {reg.name} v{reg.version} -> @{reg.alias} ({reg.reason})")
    return 0


def cmd_export(args) -> int:
    from vitray.export_format import ExportError
    from vitray.onnx_export import DEFAULT_OPSET, export_onnx
    from vitray.tracking.uris import ModelUriError

    try:
        result = export_onnx(args.model, args.output, int8=args.int8, opset=args.opset or DEFAULT_OPSET,
                             tracking_uri=args.tracking_uri,
                             register=not args.no_register, overwrite=args.overwrite)
    except (ExportError, ModelUriError, FileExistsError) as err:
        raise UsageError(str(err)) from None
    print(result.line())
    return 0


def cmd_data_pack(args) -> int:
    from vitray.data.pack import pack

    m = pack(args.src, args.out, args.format, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
             shard_rows=args.shard_rows, shard_bytes=args.shard_bytes, max_pixels=args.max_pixels,
             overwrite=args.overwrite, task=args.task, images=args.images, masks_dir=args.masks, workers=args.workers,
             shuffle=not args.keep_order, seed=args.seed)
    from vitray import console
    from vitray.data.pack import LOG_DIR

    total = sum(m.counts.values())
    splits = ", ".join(f"{s} {n:,}" for s, n in m.counts.items())
    console.say(f"[vitray] packed {total:,} images ({splits}) into {len(m.shards)} shards in {args.out} "
                f"[{m.task}, {f'{m.num_classes} classes' if m.class_names else 'unlabeled'}] in {m.source['seconds']:.1f}s")
    console.say(f"[vitray] skipped {len(m.skipped)} file(s)"
                + (" (vitray data inspect lists them with reasons)" if m.skipped else ""))
    from vitray import storage

    with console.log_to(storage.join(args.out, LOG_DIR, f"pack-{__import__('time').strftime('%Y%m%d-%H%M%S')}.log")) \
            as log:
        if log is not None:
            console.say(f"[vitray] log: {log}")
    return 0


def cmd_data_compose(args) -> int:
    from vitray import console
    from vitray.data.compose import ComposeError, compose

    try:
        r = compose(args.src, args.out, source=args.source, classes=args.classes, n=args.n, size=args.size,
                    max_items=args.max_items, val_fraction=args.val_fraction, seed=args.seed,
                    overwrite=args.overwrite, held_out_items=args.held_out_items, captions=args.captions)
    except ComposeError as err:  # exit 2 at once, without the generic handler's heavy imports (torch)
        raise UsageError(str(err)) from None
    splits = ", ".join(f"{s} {k:,}" for s, k in r.counts.items())
    console.say(f"[vitray] composed {sum(r.counts.values()):,} scenes ({splits}) with {r.items:,} items of "
                f"{len(r.classes)} classes into {args.out} (images/, masks/, classes.txt, annotations.json"
                f"{', captions.json' if args.captions else ''}) "
                f"in {r.seconds:.1f}s")
    return 0


def cmd_data_inspect(args) -> int:
    from vitray import storage
    from vitray.data.inspection import summarize, verify

    storage.check(args.out, "FOLDER")

    print(summarize(args.out))
    if args.verify:
        problems = verify(args.out)
        if problems:
            print(f"verify: {len(problems)} problem(s)")
            for p in problems:
                print(f"  {p}")
            return 1
        print("verify: every shard matches its sha256 and row count")
    return 0


def cmd_train(args) -> int:
    from vitray.train import run_training

    cfg = _load(args)
    if not cfg.data.path:
        raise UsageError("data.path is not set: point it at packed shards (vitray data pack ...) or a raw source")
    result = run_training(cfg, address=args.address, resume=args.resume)
    shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items())
                     if k.startswith("val/") and isinstance(v, (int, float)))
    print(f"[vitray] done in {result.seconds:.0f}s: {shown}")
    print(f"[vitray] run storage {result.run_dir}\n[vitray] exported model {result.export_dir}")
    return 0


SERVE_ACTIONS = ("reload", "config")


def _serve_args(args):
    """``vitray serve [reload|config] [CONFIG.yaml] [--model URI] ...`` -> (action, RunConfig)."""
    from vitray.config import load_config

    target = list(args.target)
    action = target.pop(0) if target and target[0] in SERVE_ACTIONS else "run"
    if len(target) > 1:
        raise UsageError(f"serve: expected one CONFIG.yaml, got {' '.join(target)}")
    if not target and not args.model:
        raise UsageError("serve: give a CONFIG.yaml with a serve.models list, or --model URI")
    cfg = load_config(target[0] if target else None, args.overrides)
    if args.model:
        from vitray.serve.app import model_from_uri

        cfg.serve.models = [model_from_uri(args.model, args.name)]
    cfg.serve = _with_flags(cfg.serve, "serve", {k: getattr(args, k) for k in ("host", "port", "runtime", "precision")})
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    if not cfg.serve.models:
        raise UsageError("serve: serve.models is empty: list {name, uri} entries in the config, or use --model URI")
    s = cfg.serve
    if action == "run" and s.auth_token_env and not os.environ.get(s.auth_token_env, "").strip():
        raise UsageError(f"serve.auth_token_env: environment variable {s.auth_token_env} is not set or empty")
    if action == "run" and s.auth_token_file and not (Path(s.auth_token_file).is_file()
                                                      and Path(s.auth_token_file).read_text().strip()):
        raise UsageError(f"serve.auth_token_file: {s.auth_token_file} is missing or empty")
    return action, cfg


def cmd_serve(args) -> int:
    action, cfg = _serve_args(args)
    from vitray.serve import app

    if action == "config":
        import yaml

        from vitray.tracking.uris import default_tracking_uri

        tracking_uri = default_tracking_uri(cfg.tracking.uri)
        pins = app.pin_models(cfg.serve, tracking_uri) if args.pin else None
        text = yaml.safe_dump(app.serve_config(cfg, tracking_uri, pins), sort_keys=False)
        if args.output:
            Path(args.output).write_text(text)
            print(f"Serve config written to {args.output} (deploy: serve deploy {args.output}; or a RayService's "
                  "serveConfigV2)")
        else:
            sys.stdout.write(text)
        return 0
    if action == "reload":
        for name, before, after in app.reload(cfg, address=args.address or "auto"):
            change = "unchanged" if before == after else f"{before} -> {after}"
            print(f"[vitray] {name}: version {change}")
        return 0
    return app.run(cfg, address=args.address)


def cmd_score(args) -> int:
    from vitray.config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.score = sc = _with_flags(cfg.score, "score", {
        **{k: getattr(args, k) for k in ("model", "input", "output", "batch_size", "concurrency", "runtime",
                                         "precision", "top_k", "format", "image_column", "files_per_unit",
                                         "cpus_per_actor")},
        "use_gpu": True if args.use_gpu else None})
    if args.tracking_uri:
        cfg.tracking.uri = args.tracking_uri
    missing = [f"--{k}" for k in ("model", "input", "output") if not getattr(sc, k)]
    if missing:
        command = "embed" if getattr(args, "outputs", "task") == "embedding" else "score"
        raise UsageError(f"{command}: {', '.join(missing)} required (or score.{missing[0][2:]} in the config)")
    from vitray.batch import score

    score(sc.model, sc.input, sc.output, batch_size=sc.batch_size, concurrency=sc.concurrency, use_gpu=sc.use_gpu,
          precision=sc.precision, top_k=sc.top_k, fmt=sc.format, image_column=sc.image_column,
          files_per_unit=sc.files_per_unit, cpus_per_actor=sc.cpus_per_actor, max_pixels=sc.max_pixels,
          tracking_cfg=cfg.tracking, overwrite=args.overwrite, address=args.address or cfg.cluster.address,
          resource_wait_s=cfg.cluster.resource_wait_s, stall_timeout_s=sc.stall_timeout_s,
          outputs=getattr(args, "outputs", "task"), runtime=sc.runtime)
    return 0


def _registered_generator(tracking_uri: str | None) -> str:
    """``models:/NAME@champion`` of the one registered model whose champion is a generator."""
    from vitray.tasks import TASKS
    from vitray.tracking import default_tracking_uri
    from vitray.tracking.uris import client_for

    uri = default_tracking_uri(tracking_uri)
    client = client_for(uri)
    found = []
    for rm in client.search_registered_models(max_results=1000):
        if "champion" in (rm.aliases or {}):
            mv = client.get_model_version_by_alias(rm.name, "champion")
            task = (mv.tags or {}).get("vitray.task")
            if task in TASKS and TASKS[task].inputs == "prompt":  # a model that takes prompts: a generator
                found.append(rm.name)
    if len(found) != 1:
        raise UsageError(f"--model: {'no' if not found else 'more than one'} registered generator with a champion in "
                         f"{uri}{' (' + ', '.join(found) + ')' if found else ''}; pass --model URI")
    return f"models:/{found[0]}@champion"


def cmd_generate(args) -> int:
    import json
    import re

    from vitray import console
    from vitray.chain import CatalogueError, run_chain
    from vitray.tasks.generation.generator import GenerateError

    if args.n < 1:
        raise UsageError(f"--n {args.n}: at least 1")
    if not args.model:
        args.model = _registered_generator(args.tracking_uri)
    if args.k < 1:
        raise UsageError(f"--k {args.k}: at least 1")
    try:
        results = run_chain(args.model, args.classify, args.catalogue, args.prompt, n=args.n, seed=args.seed, k=args.k,
                            steps=args.steps, guidance=args.guidance, tracking_uri=args.tracking_uri,
                            device=args.device)
    except (GenerateError, CatalogueError) as err:
        raise UsageError(str(err)) from None
    out = Path(args.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:48] or "image"
    records = []
    for r in results:
        name = f"{slug}-seed{r.seed}"
        (out / f"{name}.png").write_bytes(r.png)
        record = {"file": f"{name}.png", **r.to_json(), "model": args.model}
        for rank, hit in enumerate(r.lookalikes):
            if hit.image:
                ext = "png" if hit.image[:4] == b"\x89PNG" else "jpg"
                path = out / "lookalikes" / f"{name}-{rank + 1}.{ext}"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(hit.image)
                record["lookalikes"][rank]["file"] = str(path.relative_to(out))
        records.append(record)
        line = f"{out / record['file']}"
        if r.name is not None:
            line += f"  label {r.name!r} (p={r.score:.2f})"
        if r.lookalikes:
            line += "  look-alikes " + ", ".join(f"{x.id} ({x.similarity:.2f})" for x in r.lookalikes)
        print(line)
    with open(out / "generated.jsonl", "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    what = " and labelled" if args.classify else ""
    what += f", with the {args.k} nearest of {args.catalogue}" if args.catalogue else ""
    console.say(f"[vitray] generated{what} {len(records)} image(s) for {args.prompt!r} (seeds {args.seed}.."
                f"{args.seed + args.n - 1}) into {out}")
    return 0


def score_parser(sub, command: str, captured) -> None:
    """``vitray score`` and ``vitray embed``: the same job (input, output, exactly-once units), task answers or
    embeddings."""
    embed = command == "embed"
    p = sub.add_parser(command, help="pooled encoder features of any model into Parquet (exactly once, as score)"
                       if embed else "batch-score images with a model on Ray Data into Parquet (exactly once; "
                                     "a rerun finishes an interrupted job)")
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", help="optional config (its score section)")
    p.add_argument("--model", default=None, metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... "
                                                                 "or an export folder")
    p.add_argument("--input", default=None, metavar="PATH", help="packed shards, Parquet, WebDataset tars or an image "
                                                                  "folder")
    p.add_argument("--output", default=None, metavar="DIR", help="output folder (rerun into it to finish a job)")
    p.add_argument("--format", default=None, choices=["auto", "shards", "parquet", "webdataset", "images"])
    p.add_argument("--image-column", dest="image_column", default=None, help="Parquet input: the image column")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="images per forward (default 64)")
    p.add_argument("--concurrency", type=int, default=None, help="predictor actors (default 1)")
    p.add_argument("--cpus-per-actor", dest="cpus_per_actor", type=float, default=None)
    p.add_argument("--files-per-unit", dest="files_per_unit", type=int, default=None,
                   help="image folders: files per output part (default 1024)")
    p.add_argument("--use-gpu", dest="use_gpu", action="store_true", help="one GPU per predictor actor")
    p.add_argument("--runtime", choices=["torch", "onnx"], default=None,
                   help="torch (default), or onnx: the model's ONNX export (`vitray export --format onnx`) on CPU")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default=None,
                   help="auto, fp32, bf16 (torch); auto = fp32 or int8 (onnx)")
    if not embed:
        p.add_argument("--top-k", dest="top_k", type=int, default=None, help="classes kept per image (default 5)")
    p.add_argument("--overwrite", action="store_true", help="discard what the output folder holds and start again")
    p.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://HOST:10001 (default: a local Ray)")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow (default: tracking.uri, "
                   "$MLFLOW_TRACKING_URI, else the embedded sqlite store)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_score, outputs="embedding" if embed else "task", **({"top_k": None} if embed else {}))
    captured(p, command)


def cmd_ui(args) -> int:
    from vitray.tracking import default_tracking_uri
    from vitray.tracking.ui import run_ui

    uri = args.tracking_uri
    if not uri and args.config:
        uri = _load(args, check=False).tracking.uri
    if not uri and args.home:
        from vitray.quickstart import _home_store

        uri = _home_store(args.home)
    return run_ui(default_tracking_uri(uri), port=args.port)


def cmd_quickstart(args) -> int:
    from vitray.quickstart import run_quickstart

    run_quickstart(home=args.home, overrides=args.overrides, task=args.task)
    return 0


# ----------------------------------------------------------------------------------------------- cluster runs
def _env_pairs(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        out[key.strip()] = value
    return out


def cmd_submit(args) -> int:
    from vitray.deploy import ray_jobs
    from vitray.deploy.values import workload_of

    cfg = _load(args, check=False)
    workload = workload_of(cfg, args.workload)
    res = ray_jobs.submit(cfg, workload, address=args.address, token_file=args.token_file, env=_env_pairs(args.env),
                          package=not args.no_package, submission_id=args.submission_id,
                          tracking_uri=args.tracking_uri)
    print(f"[vitray] submitted {workload} job {res.submission_id} to {res.address}")
    if res.forwarded:
        print(f"[vitray] forwarded to the job's environment: {', '.join(res.forwarded)} (values not shown)")
    if not args.wait:
        print(f"[vitray] follow it: vitray jobs logs {res.submission_id} --follow --address {res.address}")
        return 0
    client = ray_jobs.connect(args.address, args.token_file)
    try:
        ray_jobs.follow_logs(client, res.submission_id)
        status = ray_jobs.wait(client, res.submission_id, res.address, timeout_s=60)
    except KeyboardInterrupt:
        print(f"\n[vitray] stopped following; the job keeps running (vitray jobs stop {res.submission_id} "
              f"--address {res.address})", file=sys.stderr)
        return 130
    info = ray_jobs.call(lambda: client.get_job_info(res.submission_id), res.address, res.submission_id)
    print(f"[vitray] job {res.submission_id} {status}" + (f": {info.message}" if info.message else ""))
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    import time

    from vitray.deploy import ray_jobs

    client = ray_jobs.connect(args.address, args.token_file)
    address = ray_jobs.job_address(args.address)
    if args.jobs_command == "list":
        jobs = ray_jobs.call(client.list_jobs, address)
        jobs = sorted(jobs, key=lambda j: j.start_time or 0)
        if not jobs:
            print(f"no jobs at {address}")
            return 0
        print(f"{'submission id':<40} {'status':<10} {'started':<17} {'took':>7}  entrypoint")
        for j in jobs:
            start = time.strftime("%Y-%m-%d %H:%M", time.localtime(j.start_time / 1000)) if j.start_time else "-"
            took = f"{(j.end_time - j.start_time) / 1000:.0f}s" if j.end_time and j.start_time else "-"
            print(f"{(j.submission_id or j.job_id or '-'):<40} {str(j.status).rsplit('.', 1)[-1]:<10} {start:<17} "
                  f"{took:>7}  {j.entrypoint[:60]}")
        return 0
    job_id = args.job_id
    if args.jobs_command == "status":
        info = ray_jobs.call(lambda: client.get_job_info(job_id), address, job_id)
        status = str(info.status).rsplit(".", 1)[-1]
        print(f"{job_id}: {status}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            ray_jobs.call(lambda: client.get_job_info(job_id), address, job_id)
            ray_jobs.follow_logs(client, job_id)
        else:
            sys.stdout.write(ray_jobs.call(lambda: client.get_job_logs(job_id), address, job_id))
        return 0
    stopped = ray_jobs.call(lambda: client.stop_job(job_id), address, job_id)
    print(f"{job_id}: " + ("stop requested" if stopped else "already finished"))
    return 0


def _k8s_objects(args):
    from vitray.deploy.manifests import render
    from vitray.deploy.values import chart_values

    from pydantic import ValidationError

    cfg = _load(args, check=False)
    if args.name:
        try:
            cfg.kubernetes.name = args.name
        except ValidationError as err:
            raise UsageError(f"--name {args.name!r}: {err.errors()[0]['msg']} (a DNS label: lowercase letters, "
                             "digits and '-', at most 30 characters)") from None
    values = chart_values(cfg, args.workload)
    return cfg, values, render(values, cfg.kubernetes.name, getattr(args, "namespace", None) or cfg.kubernetes.namespace)


def cmd_k8s(args) -> int:
    from vitray.deploy.manifests import dump_yaml

    if args.k8s_command == "values":
        _, values, _ = _k8s_objects(args)
        text = ("# Helm values for charts/vitray, rendered by `vitray k8s values` (helm install NAME charts/vitray "
                "-f THIS_FILE)\n" + dump_yaml(values))
    elif args.k8s_command == "render":
        _, _, objects = _k8s_objects(args)
        text = dump_yaml(objects, all_documents=True)
    else:
        return _k8s_submit(args)
    if args.output:
        Path(args.output).write_text(text)
        print(f"written to {args.output}")
    else:
        sys.stdout.write(text)
    return 0


def _k8s_submit(args) -> int:
    from vitray.deploy import k8s

    custom, core, default_ns = k8s.clients(args.context)
    args.namespace = args.namespace or None
    cfg, _, objects = _k8s_objects(args)
    namespace = args.namespace or cfg.kubernetes.namespace or default_ns
    for o in objects:
        o["metadata"]["namespace"] = namespace
    created = k8s.create(objects, namespace, custom, core)
    kind, name = created["kind"], created["metadata"]["name"]
    print(f"[vitray] created {kind} {namespace}/{name}")
    if not args.wait:
        print(f"[vitray] follow it: kubectl get {kind.lower()} {name} -n {namespace} -w")
        return 0
    try:
        if kind == "RayService":
            k8s.watch_service(custom, namespace, name, timeout_s=args.timeout)
            print(f"[vitray] RayService {namespace}/{name} is ready")
            return 0
        outcome = k8s.watch_job(custom, namespace, name, timeout_s=args.timeout)
    except KeyboardInterrupt:
        print(f"\n[vitray] stopped watching; {kind} {namespace}/{name} keeps running "
              f"(kubectl delete {kind.lower()} {name} -n {namespace} stops it)", file=sys.stderr)
        return 130
    print(f"[vitray] RayJob {namespace}/{name} ended: {outcome.deployment_status} / {outcome.job_status}"
          + (f": {outcome.message}" if outcome.message else ""))
    return 0 if outcome.succeeded else 1



# --------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitray",
        description="Pretrain, fine-tune, track, serve and batch-score Vision Transformers on Ray.",
        epilog="Exit codes: 0 success, 2 bad usage or config, 1 runtime failure.",
    )
    from vitray import __version__

    parser.add_argument("--version", action="version", version=f"vitray {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", default=False,
                        help=f"show Ray's, DeepSpeed's and MLflow's own logs on the console too (or ${VERBOSE_ENV}=1); "
                             "they always go to the run's log file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def captured(p, name: str):
        """A command whose output goes through vitray.console: quiet console, complete log file."""
        p.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                       help="library logs on the console too (they always go to the log file)")
        p.set_defaults(capture=name)

    p = sub.add_parser("quickstart", help="end-to-end demo on the embedded defaults (local Ray, sqlite MLflow, bundled data)")
    p.add_argument("--home", default=None, help="where the demo writes (default: $VITRAY_HOME or ~/.vitray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the quickstart config")
    from vitray.tasks import TASKS

    demos = [n for n, t in TASKS.items() if t.demo]
    p.add_argument("--task", default=demos[0], choices=demos, help=f"which task's demo (default {demos[0]})")
    p.set_defaults(func=cmd_quickstart)
    captured(p, "quickstart")

    p = sub.add_parser("ui", help="the MLflow UI on the store vitray logs to (127.0.0.1), with the latest run's URL")
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", help="optional config: its tracking.uri")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="default: tracking.uri of the config, "
                   "$MLFLOW_TRACKING_URI, else the embedded sqlite store")
    p.add_argument("--home", default=None, help="the store of `vitray quickstart --home DIR`")
    p.add_argument("--port", type=int, default=5000, help="default 5000 (any free port when it is taken)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("config", help="validate a config and print it resolved (every default filled in) as YAML")
    _add_config_args(p)
    p.add_argument("--output", "-o", default=None, help="write the resolved YAML here instead of stdout")
    p.add_argument("--no-check", action="store_true", help="schema only: skip the model-name and file checks")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train or fine-tune with Ray Train + DeepSpeed")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://HOST:10001 (default: a local Ray)")
    p.add_argument("--resume", default=None, metavar="RUN", help="resume run RUN (its name in the run storage) from its latest checkpoint")
    p.set_defaults(func=cmd_train)
    captured(p, "train")

    p = sub.add_parser("serve", help="serve models over HTTP with Ray Serve; `serve reload` after an alias moves; "
                                     "`serve config` renders a Serve config file (serve deploy, RayService)",
                       usage="vitray serve [reload|config] [CONFIG.yaml] [--model URI] [options]")
    p.add_argument("target", nargs="*", metavar="[reload|config] CONFIG.yaml",
                   help="a config with a serve section; first word reload or config for those actions")
    p.add_argument("--model", default=None, metavar="URI", help="serve this one model, at its task's route "
                   "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model or an export folder)")
    p.add_argument("--name", default=None, help="with --model: its name in the API (default: the registered name)")
    p.add_argument("--host", default=None, help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default serve.port, 8000)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default=None,
                   help="torch (default), or onnx: the model's ONNX export on ONNX Runtime's CPU provider")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default=None,
                   help="auto, fp32, bf16 (torch); auto = fp32 or int8 (onnx)")
    p.add_argument("--address", default=None, help="Ray cluster: 'auto' or ray://HOST:10001 (run: default a local "
                                                    "Ray; reload: default auto)")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow registry (default: tracking.uri, "
                   "$MLFLOW_TRACKING_URI, else the embedded sqlite store)")
    p.add_argument("--pin", action="store_true", help="config: write the versions the aliases name now")
    p.add_argument("--output", "-o", default=None, help="config: write the Serve config here instead of stdout")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set serve.max_batch_size=32")
    p.set_defaults(func=cmd_serve)
    captured(p, "serve")

    for command in ("score", "embed"):
        score_parser(sub, command, captured)

    p = sub.add_parser("generate", help="images for a text prompt from a generator (train.task: generation)")
    p.add_argument("prompt", metavar="PROMPT", help="what to draw, e.g. 'a large 7 at the top left'")
    p.add_argument("--model", default=None, metavar="URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... "
                                                                 "or an export folder (default: the champion of the "
                                                                 "one registered generator)")
    p.add_argument("--n", type=int, default=4, help="images (seeds SEED, SEED+1, ...; default 4)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0): the same seed, the same image")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's; "
                                                                "0 ignores the prompt)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the PNGs and generated.jsonl")
    p.add_argument("--classify", default=None, metavar="URI", help="also label each image with this classifier")
    p.add_argument("--catalogue", default=None, metavar="DIR", help="also find each image's nearest real images in "
                                                                     "this `vitray embed` output")
    p.add_argument("--k", type=int, default=5, help="look-alikes per image (default 5)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--tracking-uri", dest="tracking_uri", default=None,
                   help="MLflow tracking URI for models:/ URIs (default: $MLFLOW_TRACKING_URI, else the embedded "
                        "sqlite store)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("export", help="a model for ONNX Runtime (fp32, and int8 with --int8), checked against "
                                      "PyTorch; a registered version gets it attached")
    p.add_argument("model", metavar="MODEL_URI", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or an "
                                                      "export folder")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="the only format so far: onnx")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (linear layers dynamically "
                                                       "quantized to int8)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace what DIR holds")
    p.add_argument("--no-register", dest="no_register", action="store_true",
                   help="a registry URI: do not attach the ONNX export to the version")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="MLflow registry (default: "
                   "$MLFLOW_TRACKING_URI, else the embedded sqlite store)")
    p.set_defaults(func=cmd_export, opset=None)
    captured(p, "export")

    def cluster_args(p):
        p.add_argument("--address", default=None, help="the job server, http://HEAD:8265 (default $RAY_ADDRESS, "
                                                       "else http://127.0.0.1:8265)")
        p.add_argument("--token-file", dest="token_file", default=None,
                       help="Ray auth token (default $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")

    p = sub.add_parser("submit", help="submit a training or scoring run to a Ray cluster as a Ray job")
    _add_config_args(p)
    cluster_args(p)
    p.add_argument("--wait", action="store_true", help="stream the logs and exit with the job's status")
    p.add_argument("--workload", choices=["train", "score"], default=None,
                   help="default: kubernetes.workload, else score when score.model is set, else train")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment for the job")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow for the job (default: tracking.uri, else the client's $MLFLOW_TRACKING_URI)")
    p.add_argument("--no-package", dest="no_package", action="store_true",
                   help="use the vitray installed on the cluster instead of uploading this one")
    p.add_argument("--submission-id", dest="submission_id", default=None)
    p.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="Ray jobs on a cluster: list, status, logs, stop").add_subparsers(
        dest="jobs_command", metavar="ACTION")
    jobs.required = True
    p = jobs.add_parser("list", help="every job the cluster knows")
    cluster_args(p)
    p.set_defaults(func=cmd_jobs)
    for action, text in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a running job")):
        p = jobs.add_parser(action, help=text)
        p.add_argument("job_id", metavar="ID", help="submission id (vitray jobs list)")
        cluster_args(p)
        if action == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(func=cmd_jobs)

    k8s = sub.add_parser("k8s", help="KubeRay on Kubernetes: render a run's RayJob/RayService, its Helm values, "
                                     "or submit and watch it").add_subparsers(dest="k8s_command", metavar="ACTION")
    k8s.required = True
    for action, text in (("render", "print the ConfigMap + RayJob (or the RayService) for a config"),
                         ("values", "print the Helm values of charts/vitray for a config"),
                         ("submit", "create the RayJob (or RayService) and, with --wait, watch it to the end")):
        p = k8s.add_parser(action, help=text)
        _add_config_args(p)
        p.add_argument("--workload", choices=["train", "score", "serve"], default=None,
                       help="default: kubernetes.workload (auto: from what the config holds)")
        p.add_argument("--name", default=None, help="instance name (default kubernetes.name)")
        if action != "values":
            p.add_argument("--namespace", "-n", default=None, help="default kubernetes.namespace, else the "
                                                                  "kubeconfig context's")
        if action == "submit":
            p.add_argument("--context", default=None, help="kubeconfig context")
            p.add_argument("--wait", action="store_true", help="watch until the RayJob ends (exit 0 only when it "
                                                              "SUCCEEDED) or the RayService is ready")
            p.add_argument("--timeout", type=float, default=None, help="give up watching after this many seconds")
        else:
            p.add_argument("--output", "-o", default=None, help="write here instead of stdout")
        p.set_defaults(func=cmd_k8s)

    data = sub.add_parser("data", help="pack image sources into shards; inspect and verify them").add_subparsers(
        dest="data_command", metavar="ACTION")
    data.required = True
    p = data.add_parser("pack", help="pack an image source into Parquet shards + manifest.json")
    p.add_argument("src", metavar="SRC", help="source folder/file (ignored for sklearn-digits)")
    p.add_argument("out", metavar="OUT", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--format", required=True, help="imagefolder | coco | masks | webdataset | sklearn-digits")
    p.add_argument("--val-fraction", type=float, default=0.1, help="hash split when the source has no splits")
    p.add_argument("--test-fraction", type=float, default=0.0)
    p.add_argument("--shard-rows", type=int, default=10_000, help="max rows per shard")
    p.add_argument("--shard-bytes", type=int, default=256 << 20, help="max encoded bytes per shard")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="refuse larger images (decompression bombs)")
    p.add_argument("--task", default=None, help="coco only: detection (default) or segmentation")
    p.add_argument("--images", default=None, help="coco only: image folder (default: beside the JSON)")
    p.add_argument("--masks", default=None, help="masks only: mask folder (default: SRC/masks)")
    p.add_argument("--workers", type=int, default=None, help="decode threads for validation (default: cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row order (recorded in the manifest)")
    p.add_argument("--keep-order", action="store_true",
                   help="write rows in source order instead of a seeded random order (only for sources already "
                        "shuffled: a class-sorted folder packed in order trains badly)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT")
    p.set_defaults(func=cmd_data_pack)
    captured(p, "pack")
    p = data.add_parser("compose", help="scenes with exact masks and boxes (COCO + mask folder) from a labelled "
                                         "classification set")
    p.add_argument("src", metavar="SRC", help="image folder SRC/CLASS/IMAGE, or - with --from sklearn-digits")
    p.add_argument("out", metavar="OUT", help="output folder (must be empty unless --overwrite)")
    p.add_argument("--from", dest="source", default="imagefolder", choices=["imagefolder", "sklearn-digits"],
                   help="what SRC is (default imagefolder)")
    p.add_argument("--classes", default=None, metavar="A,B,...", help="keep only these class names (default all)")
    p.add_argument("--n", type=int, default=600, help="scenes in all (default 600)")
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels (default 64)")
    p.add_argument("--max-items", type=int, default=3, help="items per scene: 1 to this (default 3)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of scenes in val (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="everything follows from it (default 0)")
    p.add_argument("--held-out-items", action="store_true",
                   help="val scenes paste only source images no train scene uses (a val metric on unseen items)")
    p.add_argument("--captions", action="store_true",
                   help="also write captions.json (COCO captions): one sentence per scene from its layout, e.g. "
                        "'two items: a 7 at the top left and a small 2 at the bottom'")
    p.add_argument("--overwrite", action="store_true", help="replace a composed set already in OUT")
    p.set_defaults(func=cmd_data_compose)
    p = data.add_parser("inspect", help="counts per split and class, skipped files, sizes")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--verify", action="store_true", help="check every shard's sha256 and row count")
    p.set_defaults(func=cmd_data_inspect)

    models = sub.add_parser("models", help="model zoo and registry").add_subparsers(dest="models_command", metavar="ACTION")
    models.required = True
    p = models.add_parser("zoo", help="buildable architectures with parameters and GFLOPs")
    p.add_argument("--vitray-only", action="store_true", help="only vitray's small-image configs")
    p.add_argument("--filter", default=None, help="substring(s) the name must contain, comma-separated (any of them)")
    p.set_defaults(func=cmd_models_zoo)

    def tracking_arg(p):
        p.add_argument("--tracking-uri", default=None, metavar="URI",
                       help="MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else the embedded sqlite store)")

    p = models.add_parser("list", help="registered models with their champion and challenger versions")
    tracking_arg(p)
    p.set_defaults(func=cmd_models_list)
    p = models.add_parser("show", help="the versions of a registered model: aliases, metric, run, gate decision")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--metric", default="val/top1", help="metric column to show (default val/top1)")
    tracking_arg(p)
    p.set_defaults(func=cmd_models_show)
    p = models.add_parser("promote", help="point an alias (champion, challenger, ...) at a version by hand")
    p.add_argument("name", metavar="NAME")
    p.add_argument("version", metavar="VERSION", type=int)
    p.add_argument("--alias", required=True, help="e.g. champion")
    tracking_arg(p)
    p.set_defaults(func=cmd_models_promote)
    p = models.add_parser("register", help="log an export folder as an MLflow model, register it, run the gate")
    p.add_argument("export_dir", metavar="EXPORT_DIR", help="a training run's export folder (<run>/export)")
    p.add_argument("--name", default=None, help="registered model name (default: tracking.registered_model of the "
                                                 "run that wrote the export)")
    p.add_argument("--experiment", default=None, help="experiment for a new run when the training run is not found")
    p.add_argument("--promotion-metric", dest="promotion_metric", default=None, help="default: the task's primary metric (val/top1, val/miou)")
    p.add_argument("--promotion-mode", dest="promotion_mode", choices=["max", "min"], default=None)
    tracking_arg(p)
    p.set_defaults(func=cmd_models_register)
    return parser


def _find_cause(err: BaseException, kind: type) -> BaseException | None:
    """``err`` or the first of its causes/contexts that is a ``kind``; Ray Train wraps worker errors, and a worker's
    DataStallError reaches the driver as text inside them, so its message is recovered from there too."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        text = str(err)
        if f"{kind.__name__}: " in text:
            line = text[text.index(f"{kind.__name__}: ") + len(kind.__name__) + 2:].splitlines()[0]
            return kind(line)
        err = err.__cause__ or err.__context__
    return None


def _captured(func: Callable, args) -> int:
    """``func`` inside vitray.console's capture when the command is one of the captured ones."""
    name = getattr(args, "capture", None)
    if not name:
        return int(func(args) or 0)
    from vitray import console

    with console.capture(name, getattr(args, "verbose", False)):
        return int(func(args) or 0)


def _log_hint() -> str:
    from vitray.console import last_log

    path = last_log()
    return f" (full log: {path})" if path else ""


def _run(func: Callable, args) -> int:
    from vitray.config import ConfigError

    try:
        return _captured(func, args)
    except (ConfigError, UsageError) as err:
        print(f"vitray: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `vitray models zoo | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("vitray: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence: one line, no traceback
        from vitray.data import ManifestError, SourceError
        from vitray.models import CheckpointError, UnknownModelError
        from vitray.storage import StorageError

        if isinstance(err, (CheckpointError, UnknownModelError, SourceError, ManifestError, StorageError)):
            print(f"vitray: error: {err}", file=sys.stderr)
            return 2
        from vitray.capacity import CapacityError
        from vitray.deploy.k8s import K8sError
        from vitray.deploy.ray_jobs import JobsError
        from vitray.tracking.runs import TrackingError
        from vitray.watchdog import DataStallError

        from vitray.tracking.ui import UiError

        stall = _find_cause(err, DataStallError)
        if stall is not None:
            print(f"vitray: failed: {stall}{_log_hint()}", file=sys.stderr)
            return 1
        if isinstance(err, (TrackingError, JobsError, K8sError, CapacityError, UiError)):
            print(f"vitray: failed: {err}{_log_hint()}", file=sys.stderr)
            return 1
        if "VITRAY_DEBUG" in __import__("os").environ:
            raise
        hint = _log_hint()
        print(f"vitray: failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
              f"{hint or ' (set VITRAY_DEBUG=1 for the traceback)'}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
