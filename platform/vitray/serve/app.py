"""The Serve application: built from the ``serve`` config section, run locally, rendered as a Serve config file,
and reloaded in place.

* :func:`build_app` is the application builder behind the import path ``vitray.serve.app:build_app``: ``serve
  deploy``, ``serve run`` and a KubeRay RayService (``serveConfigV2``) build the same application from the ``args``
  that :func:`serve_config` writes.
* :func:`run` is ``vitray serve``: pins every registry alias to its version, checks each model loads, starts Serve on
  ``serve.host:serve.port`` and deploys.
* :func:`reload` is ``vitray serve reload``: re-pins the aliases and redeploys. Only the models' ``user_config``
  changes, so Serve reconfigures the running replicas in place (no restart): each loads the new version beside the
  old one and swaps; requests already admitted finish on the old one.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from vitray import __version__
from vitray.config import ConfigError, RunConfig, ServeConfig, ServedModel

__all__ = ["APP_NAME", "IMPORT_PATH", "build_app", "app_args", "plan", "serve_config", "pin_models", "check_models",
           "deploy", "run", "reload", "model_from_uri", "deployment_name", "colocated"]

APP_NAME = "vitray"
IMPORT_PATH = "vitray.serve.app:build_app"


def deployment_name(model: str) -> str:
    return f"model-{model}"


def model_from_uri(uri: str, name: str | None = None) -> ServedModel:
    """``vitray serve --model URI``: one model (of the task its export says), named after the registered model or
    the folder."""
    if not name:
        if uri.startswith("models:/"):
            name = uri[len("models:/"):].split("@")[0].split("/")[0]
        else:
            name = Path(uri.rstrip("/")).name if not uri.startswith("runs:/") else "model"
        name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in name).lstrip("-_.") or "model"
    return ServedModel(name=name, uri=uri)


def _unpinned(uri: str) -> dict:
    return {"uri": uri, "name": None, "version": None, "alias": None, "source": uri}


def pin_models(cfg: ServeConfig, tracking_uri: str | None) -> dict[str, dict]:
    """Each model's URI resolved to what it points at now (``models:/NAME@ALIAS`` -> ``models:/NAME/7``)."""
    from vitray.tracking.uris import pin_model_uri

    return {m.name: pin_model_uri(m.uri, tracking_uri) for m in cfg.models}


def check_models(pins: dict[str, dict], tracking_uri: str | None, configured: dict | None = None,
                 runtime: str = "torch") -> dict[str, dict]:
    """Fail before deploying (a replica that cannot load its model is restarted by Serve forever): each pinned
    model resolves to an export whose task can be served (on ``runtime``: for onnx, the version's ONNX export), and
    the task configured for it (if any). Returns each model's export meta."""
    import tempfile

    from vitray.export_format import read_export_meta
    from vitray.tasks import TaskError, get_task
    from vitray.tracking.uris import resolve_model_uri

    metas = {}
    configured = dict(configured or {})
    for name, pin in pins.items():
        with tempfile.TemporaryDirectory(prefix="vitray-check-") as tmp:
            folder = resolve_model_uri(pin["uri"], tracking_uri, dest=tmp, runtime=runtime)
            meta = read_export_meta(folder)
        if runtime == "onnx" and not meta.get("onnx"):
            raise ConfigError(f"serve.models {name} ({pin['source']}): serve.runtime onnx, but {folder} is a PyTorch "
                              f"export; write its ONNX export with "
                              f"`vitray export {pin['source']} --format onnx -o DIR`")
        try:
            get_task(meta["task"], "infer")
        except TaskError as err:
            raise ConfigError(f"serve.models {name} ({pin['source']}): {err}") from None
        if configured.get(name) and configured[name] != meta["task"]:
            raise ConfigError(f"serve.models {name}: task {configured[name]!r} configured, but {pin['source']} is a "
                              f"{meta['task']} model")
        metas[name] = meta
    return metas


def _ongoing(cfg: ServeConfig) -> int:
    return cfg.max_ongoing_requests or 2 * cfg.max_batch_size


def colocated(cfg: ServeConfig) -> bool:
    """One model and ``serve.colocate``: the model runs inside the ingress replica (one deployment, no hop)."""
    return cfg.colocate and len(cfg.models) == 1


def _model_user_config(cfg: ServeConfig, pin: dict) -> dict:
    return {"model": pin, "max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s}


def _scaling(cfg: ServeConfig) -> dict:
    if cfg.min_replicas == cfg.max_replicas:
        return {"num_replicas": cfg.max_replicas}
    return {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                   "target_ongoing_requests": cfg.target_ongoing_requests}}


def plan(cfg: ServeConfig, pins: dict[str, dict] | None = None) -> list[dict]:
    """The deployments of the application with their Serve options, ingress first: what :func:`build_app` binds
    and what :func:`serve_config` writes, from one place."""
    pins = pins or {}
    model_resources = {"ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
                       "max_ongoing_requests": _ongoing(cfg), "graceful_shutdown_timeout_s": 30.0, **_scaling(cfg)}
    if colocated(cfg):
        m = cfg.models[0]
        return [{"name": "ingress", **model_resources,
                 "user_config": {"models": {m.name: _model_user_config(cfg, pins.get(m.name) or _unpinned(m.uri))}}}]
    # every request passes through the ingress: let it hold all the models' in-flight requests
    out = [{"name": "ingress", "num_replicas": cfg.ingress_replicas, "ray_actor_options": {"num_cpus": cfg.ingress_cpus},
            "max_ongoing_requests": max(256, 4 * _ongoing(cfg) * cfg.max_replicas * len(cfg.models))}]
    for m in cfg.models:
        out.append({"name": deployment_name(m.name), **model_resources,
                    "user_config": _model_user_config(cfg, pins.get(m.name) or _unpinned(m.uri))})
    return out


def app_args(cfg: ServeConfig, tracking_uri: str | None, pins: dict[str, dict] | None = None) -> dict:
    return {"serve": cfg.model_dump(mode="json"), "tracking_uri": tracking_uri, "pins": pins or {}}


def _stable_version(*parts) -> str:
    """Serve restarts replicas when a deployment's code version changes and only reconfigures them when just
    ``user_config`` changes. ``serve.run`` draws a random version per call unless one is given, so the version
    is a hash of everything but ``user_config``: a reload is then a reconfigure, as it is for a config file."""
    return hashlib.sha256(json.dumps([__version__, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _options(spec: dict, *init) -> dict:
    opts = {k: v for k, v in spec.items() if k != "name"}
    return {"name": spec["name"], "version": _stable_version(spec["name"], init,
                                                           {k: v for k, v in opts.items() if k != "user_config"}),
            "_internal": True, **opts}


def build_app(args: dict):
    """Application builder (``import_path: vitray.serve.app:build_app``); ``args`` as written by :func:`app_args`."""
    from pydantic import ValidationError

    from .ingress import Ingress
    from .model import ModelDeployment

    try:
        cfg = ServeConfig.model_validate(args.get("serve") or {})
    except ValidationError as err:
        from vitray.config import _format_errors

        raise ValueError(str(_format_errors(err, "serve args"))) from None
    if not cfg.models:
        raise ValueError("serve.models is empty: list at least one {name, uri}, or use `vitray serve --model URI`")
    tracking_uri = args.get("tracking_uri")
    specs = {spec["name"]: spec for spec in plan(cfg, args.get("pins"))}
    inits = {m.name: (m.name, tracking_uri, cfg.precision, cfg.max_pixels, cfg.decode_threads, m.task, cfg.runtime)
             for m in cfg.models}
    tasks = {m.name: m.task for m in cfg.models}
    settings = {k: getattr(cfg, k) for k in ("max_body_bytes", "max_pixels", "decode", "decode_threads",
                                             "auth_token_env", "auth_token_file")}
    if colocated(cfg):
        return Ingress.options(**_options(specs["ingress"], tasks, settings, inits)).bind({}, tasks, settings, inits)
    handles = {name: ModelDeployment.options(**_options(specs[deployment_name(name)], init)).bind(*init)
               for name, init in inits.items()}
    return Ingress.options(**_options(specs["ingress"], tasks, settings)).bind(handles, tasks, settings)


def serve_config(cfg: RunConfig, tracking_uri: str | None = None, pins: dict[str, dict] | None = None,
                 host: str | None = None) -> dict:
    """A Serve config file (the ``serve deploy`` schema, and a RayService's ``serveConfigV2``) that deploys the
    same application as ``vitray serve``. Without ``pins``, replicas resolve aliases when they start; pass pins
    (``pin_models``) to fix the versions, and render again after the alias moves to roll out the new one."""
    from vitray.tracking.uris import default_tracking_uri

    s = cfg.serve
    tracking_uri = tracking_uri or cfg.tracking.uri or default_tracking_uri()
    config = {"proxy_location": "EveryNode",
              "http_options": {"host": host or s.host, "port": s.port},
              "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
                                # pins live in the deployments' user_config only: Serve hashes args into the code
                                # version, so pins in args would turn a re-rendered config into a restart
                                "args": app_args(s, tracking_uri), "deployments": plan(s, pins)}]}
    return json.loads(json.dumps(config))  # plain data, no shared objects (YAML would write anchors for them)


# ------------------------------------------------------------------------------------------------- running
def _describe(cfg: ServeConfig, pins: dict, metas: dict) -> list[str]:
    lines = []
    for m in cfg.models:
        pin, meta = pins[m.name], metas[m.name]
        version = f"version {pin['version']}" + (f" ({pin['alias']})" if pin["alias"] else "") if pin["version"] else ""
        from vitray.predict import head_of
        from vitray.tasks import get_task

        lines.append(f"  {m.name:<16} {pin['source']}{' -> ' + version if version else ''}: {meta['task']} at "
                     f"POST {get_task(meta['task']).route}, {meta['model']['name']}, {head_of(meta).describe(meta)}, "
                     f"{meta['preprocessing']['img_size']} px")
    return lines


def _wait_running(timeout_s: float = 300.0) -> None:
    from ray import serve

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and str(app.status).endswith("RUNNING"):
            return
        if app is not None and str(app.status).endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise RuntimeError(f"Serve application {APP_NAME} {app.status}: {app.message[:500]}")
        time.sleep(0.5)
    raise TimeoutError(f"Serve application {APP_NAME} not running after {timeout_s:.0f}s")


def deploy(cfg: RunConfig, tracking_uri: str | None = None, start_http: bool = True, pins: dict | None = None,
           metas: dict | None = None):
    """Deploy (or update) the application on the connected Ray cluster; returns (pins, metas). ``metas`` given:
    the pinned models were already checked."""
    from ray import serve

    from vitray.tracking.uris import default_tracking_uri

    tracking_uri = default_tracking_uri(tracking_uri or cfg.tracking.uri)
    pins = pins or pin_models(cfg.serve, tracking_uri)
    metas = metas or check_models(pins, tracking_uri, {m.name: m.task for m in cfg.serve.models}, cfg.serve.runtime)
    if start_http:
        serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(build_app(app_args(cfg.serve, tracking_uri, pins)), name=APP_NAME, route_prefix="/")
    _wait_running()
    return pins, metas


def current_versions() -> dict[str, str | None]:
    """The version each served model answers with now (asked through the ingress)."""
    from ray import serve

    return serve.get_app_handle(APP_NAME).versions.remote().result(timeout_s=60)


def _ensure_capacity(cfg: RunConfig) -> None:
    """The replicas' reservation at min_replicas (autoscaling adds more only where there is room) against the
    cluster: a deployment whose replicas can never be placed would wait forever, so it fails here instead."""
    from vitray.capacity import ensure_capacity, plan_resources

    sc = cfg.serve
    replicas = [(d.get("num_replicas") or sc.min_replicas or 1, d["ray_actor_options"]) for d in plan(sc)]
    cpus = sum(n * o.get("num_cpus", 0) for n, o in replicas)
    gpus = sum(n * o.get("num_gpus", 0) for n, o in replicas)
    what = " + ".join(f"{n} {d['name']} replica{'s' if n > 1 else ''} x {o.get('num_cpus', 0):g} CPU"
                      for (n, o), d in zip(replicas, plan(sc)))
    rplan = plan_resources("serve", what, cpus, gpus, needs_data=False, grow_wait_s=cfg.cluster.resource_wait_s,
                           fields=["serve.min_replicas", "serve.cpus_per_replica", "serve.gpus_per_replica",
                                   "serve.ingress_cpus"])
    print(rplan.line(), flush=True)
    ensure_capacity(rplan)


def run(cfg: RunConfig, address: str | None = None, block: bool = True) -> int:
    """``vitray serve``: a local Ray instance (or ``address``), Serve on host:port, the app deployed."""
    import signal
    import threading

    import ray
    from ray import serve

    if not cfg.serve.models:
        raise ConfigError("serve.models is empty: list at least one {name, uri} in the config, or use "
                          "`vitray serve --model URI`")
    from vitray.tracking.uris import default_tracking_uri

    tracking_uri = default_tracking_uri(cfg.tracking.uri)
    pins = pin_models(cfg.serve, tracking_uri)
    # fail fast, before Ray
    metas = check_models(pins, tracking_uri, {m.name: m.task for m in cfg.serve.models}, cfg.serve.runtime)
    address = address or cfg.cluster.address
    if not ray.is_initialized():  # replicas' output comes to the driver: into the command's log (vitray.console)
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    _ensure_capacity(cfg)
    t0 = time.time()
    pins, metas = deploy(cfg, tracking_uri, pins=pins, metas=metas)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    print(f"[vitray] serving {len(pins)} model(s) on {url} in {time.time() - t0:.0f}s (API docs: {url}/docs)",
          flush=True)
    for line in _describe(cfg.serve, pins, metas):
        print(line, flush=True)
    from vitray.tasks import get_task

    first = cfg.serve.models[0].name
    print(f"  try: curl -s -X POST -H 'content-type: image/png' --data-binary @image.png "
          f"'{url}{get_task(metas[first]['task']).route}?model={first}'", flush=True)
    from vitray.console import current_log

    if current_log():
        print(f"[vitray] log (Serve's own, the replicas' and request lines): {current_log()}", flush=True)
    if not block:
        return 0
    if address:
        print("[vitray] deployed on the cluster; it keeps serving after this command exits "
              f"(`serve shutdown` or `serve delete {APP_NAME}` to stop it)", flush=True)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("[vitray] Ctrl-C to stop", flush=True)
    stop.wait()
    print("[vitray] stopping Serve", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0


def reload(cfg: RunConfig, address: str | None = "auto") -> list[tuple[str, str | None, str | None]]:
    """``vitray serve reload``: point the running replicas at the versions the aliases name now.
    Returns (model, version before, version after) per model."""
    import ray

    from vitray.tracking.uris import default_tracking_uri

    tracking_uri = default_tracking_uri(cfg.tracking.uri)
    pins = pin_models(cfg.serve, tracking_uri)
    metas = check_models(pins, tracking_uri, {m.name: m.task for m in cfg.serve.models}, cfg.serve.runtime)
    if not ray.is_initialized():
        ray.init(address=address or "auto", log_to_driver=False)
    before = current_versions()
    deploy(cfg, tracking_uri, start_http=False, pins=pins, metas=metas)
    want = {name: pin["version"] for name, pin in pins.items()}
    deadline = time.time() + 300
    while (now := current_versions()) != want:  # the ingress's path answers with the new versions
        if time.time() > deadline:
            raise RuntimeError(f"reload: after 300s the models still answer with {now}, expected {want}; see "
                               "`serve status`")
        time.sleep(0.5)
    return [(name, before.get(name), now.get(name)) for name in pins]
