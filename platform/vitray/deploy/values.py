"""A run config as Helm chart values: the one place that decides how a vitray run maps onto KubeRay.

``chart_values(cfg)`` is what ``vitray k8s values CONFIG`` prints (install it with ``helm install -f``) and what
``vitray k8s render|submit`` renders through :mod:`vitray.deploy.manifests`.
"""
from __future__ import annotations

import math

import yaml

from vitray.config import ConfigError, RunConfig

__all__ = ["WORKLOADS", "workload_of", "worker_groups", "chart_values", "default_entrypoint", "job_entrypoint",
           "JOB_SCRIPTS"]

WORKLOADS = ("train", "score", "serve")
JOBS_DIR = "/home/ray/vitray/jobs"  # where the Dockerfile puts jobs/
JOB_SCRIPTS = {"train": f"{JOBS_DIR}/train.py", "score": f"{JOBS_DIR}/score.py"}


def workload_of(cfg: RunConfig, workload: str | None = None) -> str:
    """train, score or serve: the explicit choice, else kubernetes.workload, else what the config holds."""
    chosen = workload or cfg.kubernetes.workload
    if chosen != "auto":
        return chosen
    if cfg.score.model and cfg.score.input:
        return "score"
    if cfg.serve.models and not cfg.data.path:
        return "serve"
    if cfg.data.path:
        return "train"
    raise ConfigError("kubernetes.workload: nothing to run: set data.path (train), score.model + score.input "
                      "(score) or serve.models (serve), or pass --workload")


def default_entrypoint(workload: str, mount: str) -> str:
    return f"python {JOB_SCRIPTS[workload]} {mount}/run.yaml"


SHELL_OPERATORS = ("&&", "||", ";", "|", ">", "<", "$(", "`")


def job_entrypoint(entrypoint: str) -> str:
    """KubeRay's submitter (K8sJobMode) pastes the entrypoint unquoted into its own ``bash -c`` line, so a shell
    operator would end the ``ray job submit`` command there and run the rest in the submitter pod: wrap such an
    entrypoint in ``bash -ec '...'`` (Ray's CLI re-quotes its arguments, so the job runs the whole line)."""
    import shlex

    if any(op in entrypoint for op in SHELL_OPERATORS) and not entrypoint.lstrip().startswith(("bash -", "sh -")):
        return f"bash -ec {shlex.quote(entrypoint)}"
    return entrypoint


def _group(name: str, replicas: int, lo: int, hi: int, cpu: str, memory: str, gpus: int, node_selector: dict,
           tolerations: list) -> dict:
    quantity = {"cpu": cpu, "memory": memory}
    return {"name": name, "replicas": replicas, "minReplicas": lo, "maxReplicas": hi, "gpus": gpus,
            "resources": {"requests": dict(quantity), "limits": dict(quantity)},
            "nodeSelector": dict(node_selector), "tolerations": [dict(t) for t in tolerations]}


def worker_groups(cfg: RunConfig, workload: str) -> list[dict]:
    """kubernetes.worker_groups as given, else one group sized for the workload: a pod per Ray Train worker, per
    scoring actor, or per Serve replica (min..max replicas), with whole GPUs where the run uses them."""
    k = cfg.kubernetes
    if k.worker_groups is not None:
        out = []
        for g in k.worker_groups:
            gpu = g.gpus > 0
            out.append(_group(g.name, g.replicas, g.min_replicas, g.max_replicas, g.cpu, g.memory, g.gpus,
                              g.node_selector or (k.gpu_node_selector if gpu else {}),
                              g.tolerations or (k.gpu_tolerations if gpu else [])))
        return out
    if workload == "train":
        c = cfg.cluster
        gpus = math.ceil(c.gpus_per_worker) if c.use_gpu else 0
        lo = hi = n = c.num_workers
    elif workload == "score":
        s = cfg.score
        gpus = 1 if s.use_gpu else 0
        lo = hi = n = s.concurrency
    else:
        from vitray.serve.app import colocated  # torch-free

        s = cfg.serve
        gpus = math.ceil(s.gpus_per_replica)
        # a pod per model replica: one deployment per model (several models or colocate: false), each scaling
        # between min and max replicas; a separate router ingress lives on the head
        models = max(1, len(s.models)) if not colocated(s) else 1
        n, lo, hi = max(1, s.min_replicas) * models, s.min_replicas * models, s.max_replicas * models
    name = "gpu" if gpus else "cpu"
    return [_group(name, n, lo, hi, k.worker_cpu, k.worker_memory, gpus, k.gpu_node_selector if gpus else {},
                   k.gpu_tolerations if gpus else [])]


def _split_image(image: str) -> tuple[str, str]:
    last = image.rsplit("/", 1)[-1]
    if "@" in last or ":" not in last:
        return image, "latest" if "@" not in last else ""
    repo, tag = image.rsplit(":", 1)
    return repo, tag


def chart_values(cfg: RunConfig, workload: str | None = None, tracking_uri: str | None = None) -> dict:
    """The chart values that deploy this run. ``tracking_uri``: what the Serve replicas use (default: the chart's
    MLflow server, or kubernetes.mlflow_uri)."""
    k = cfg.kubernetes
    workload = workload_of(cfg, workload)
    repo, tag = _split_image(k.image)
    if not tag:
        raise ConfigError(f"kubernetes.image: give a tag (repository:tag), got {k.image!r}")
    values: dict = {
        "fullnameOverride": k.name,
        "image": {"repository": repo, "tag": tag, "pullPolicy": k.image_pull_policy},
        "imagePullSecrets": [{"name": s} for s in k.image_pull_secrets],
        "rayVersion": k.ray_version,
        "auth": {"mode": k.auth},
        "env": dict(k.env),
        "storage": {"enabled": k.shared_storage, "existingClaim": k.storage_claim or "",
                    "mountPath": k.storage_mount},
        "objectStorage": {"existingSecret": k.object_storage_secret or "", "endpoint": k.object_storage_endpoint or ""},
        "mlflow": {"enabled": k.mlflow_uri is None, "externalUri": k.mlflow_uri or ""},
        "head": {"resources": {"requests": {"cpu": k.head_cpu, "memory": k.head_memory},
                               "limits": {"cpu": k.head_cpu, "memory": k.head_memory}}},
        "workerGroups": worker_groups(cfg, workload),
        "autoscaling": {"enabled": k.autoscaling},
    }
    if workload == "serve":
        from vitray.deploy.manifests import DEFAULTS, merge, tracking_uri as chart_tracking_uri
        from vitray.serve.app import serve_config

        uri = tracking_uri or cfg.tracking.uri or chart_tracking_uri(merge(DEFAULTS, values), k.name)
        values["job"] = {"enabled": False}
        values["service"] = {"enabled": True, "upgradeStrategy": k.upgrade_strategy,
                             "serveConfig": serve_config(cfg, uri, host="0.0.0.0")}
        return values
    entrypoint = job_entrypoint(k.entrypoint or default_entrypoint(workload, "/etc/vitray"))
    values["job"] = {
        "enabled": True, "workload": workload, "entrypoint": entrypoint,
        "submissionMode": k.submission_mode, "shutdownAfterJobFinishes": k.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished, "backoffLimit": k.backoff_limit,
        "activeDeadlineSeconds": k.active_deadline_seconds or 0,
        "runConfig": yaml.safe_dump(_job_config(cfg), sort_keys=False),
    }
    values["service"] = {"enabled": False}
    return values


AUTOSCALING_RESOURCE_WAIT_S = 600.0  # a new GPU node (pod scheduled, image pulled, Ray started) takes minutes


def _job_config(cfg: RunConfig) -> dict:
    """The resolved run config the job reads, every field written out (the image's vitray parses it with the same
    schema; no default of another version can slip in). The kubernetes section stays with the submitter."""
    data = cfg.model_dump(mode="json", exclude={"kubernetes"})
    if cfg.kubernetes.autoscaling and not cfg.cluster.resource_wait_s:
        # KubeRay's autoscaler adds worker pods on demand: give it time before a plan that does not fit yet fails
        data["cluster"]["resource_wait_s"] = AUTOSCALING_RESOURCE_WAIT_S
    return data
