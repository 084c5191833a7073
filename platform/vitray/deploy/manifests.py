"""KubeRay objects for a vitray run, rendered from the Helm chart's values by the chart's own rules.

``vitray k8s render|submit`` and the chart (``charts/vitray/templates``) produce the same RayJob, RayService and
run-config ConfigMap for the same values: :mod:`vitray.deploy.values` maps a run config to chart values, this module
renders them, and ``tests/test_chart.py`` renders the chart with ``helm template`` from those values and requires
identical objects. Change a template and this module together.

Torch-free: nothing here imports the training or serving stack.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

__all__ = ["CHART", "DEFAULTS", "CONFIG_MOUNT", "fullname", "ray_cluster_spec", "run_config_map", "ray_job",
           "ray_service", "render", "merge", "dump_yaml"]

CHART = "vitray"
CONFIG_MOUNT = "/etc/vitray"
RAY_PORTS = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
             {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]

# The chart's defaults for what the run config does not decide (charts/vitray/values.yaml holds the same).
DEFAULTS: dict[str, Any] = {
    "nameOverride": "",
    "fullnameOverride": "",
    "imagePullSecrets": [],
    "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                           "seccompProfile": {"type": "RuntimeDefault"}},
    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    "env": {},
    "storage": {"enabled": True, "existingClaim": "", "mountPath": "/mnt/vitray"},
    "objectStorage": {"existingSecret": "", "endpoint": ""},
    "mlflow": {"enabled": True, "externalUri": "", "port": 5000},
    "head": {"rayStartParams": {}},
    "autoscaling": {"enabled": True, "idleTimeoutSeconds": 60,
                    "resources": {"requests": {"cpu": "200m", "memory": "256Mi"},
                                  "limits": {"cpu": "500m", "memory": "512Mi"}}},
    "job": {"enabled": True, "submissionMode": "K8sJobMode", "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600, "backoffLimit": 0, "activeDeadlineSeconds": 0,
            "runtimeEnv": {"env_vars": {"PYTHONUNBUFFERED": "1"}},
            "submitter": {"resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                        "limits": {"cpu": "500m", "memory": "512Mi"}}}},
    "service": {"enabled": False, "upgradeStrategy": "NewCluster", "serveConfig": {}},
}


def merge(base: dict, override: dict) -> dict:
    """Helm's values merge: maps merge key by key, anything else (lists included) replaces; None deletes."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------------------------------ names, labels
def fullname(values: dict, release: str) -> str:
    """The chart's ``vitray.fullname``: fullnameOverride, else the release name if it holds the chart name, else
    <release>-<chart>; at most 40 characters (KubeRay adds suffixes to a RayJob's name)."""
    if values.get("fullnameOverride"):
        return values["fullnameOverride"][:40].rstrip("-")
    name = values.get("nameOverride") or CHART
    return (release if name in release else f"{release}-{name}")[:40].rstrip("-")


def selector_labels(values: dict, release: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": (values.get("nameOverride") or CHART)[:63],
            "app.kubernetes.io/instance": release, "app.kubernetes.io/component": component}


def _metadata(values: dict, release: str, name: str, component: str) -> dict:
    return {"name": name, "labels": {**selector_labels(values, release, component), "app.kubernetes.io/part-of": CHART}}


# ------------------------------------------------------------------------------------------------ pod pieces
def tracking_uri(values: dict, release: str) -> str:
    m = values["mlflow"]
    return f"http://{fullname(values, release)}-mlflow:{m['port']}" if m["enabled"] else m.get("externalUri", "")


def claim_name(values: dict, release: str) -> str:
    return values["storage"].get("existingClaim") or f"{fullname(values, release)}-data"


def _env(values: dict, release: str) -> list[dict]:
    env = []
    uri = tracking_uri(values, release)
    if uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": uri})
    if values["storage"]["enabled"]:
        env.append({"name": "VITRAY_HOME", "value": values["storage"]["mountPath"]})
    if values["objectStorage"]["endpoint"]:
        env.append({"name": "AWS_ENDPOINT_URL", "value": values["objectStorage"]["endpoint"]})
    env += [{"name": k, "value": str(v)} for k, v in sorted(values["env"].items())]
    return env


def _env_from(values: dict) -> list[dict]:
    """Object storage credentials: an existing Secret, every key as an environment variable (never in values)."""
    secret = values["objectStorage"]["existingSecret"]
    return [{"secretRef": {"name": secret}}] if secret else []


def _mounts_and_volumes(values: dict, release: str, config_map: str | None):
    mounts = [{"name": "shm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "shm", "emptyDir": {"medium": "Memory"}}]
    if values["storage"]["enabled"]:
        mounts.append({"name": "data", "mountPath": values["storage"]["mountPath"]})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim_name(values, release)}})
    if config_map:
        mounts.append({"name": "run-config", "mountPath": CONFIG_MOUNT, "readOnly": True})
        volumes.append({"name": "run-config", "configMap": {"name": config_map}})
    return mounts, volumes


def _image(values: dict) -> str:
    return f"{values['image']['repository']}:{values['image']['tag']}"


def _pod_spec(values: dict, container: dict, volumes: list, extra: dict | None = None) -> dict:
    spec: dict[str, Any] = {"securityContext": copy.deepcopy(values["podSecurityContext"])}
    if values["imagePullSecrets"]:
        spec["imagePullSecrets"] = copy.deepcopy(values["imagePullSecrets"])
    spec.update(copy.deepcopy(extra or {}))
    spec["containers"] = [container]
    spec["volumes"] = volumes
    return spec


def _resources(resources: dict, gpus: int) -> dict:
    out = copy.deepcopy(resources)
    if gpus > 0:
        out.setdefault("limits", {})["nvidia.com/gpu"] = int(gpus)
    return out


def ray_cluster_spec(values: dict, release: str, component: str, config_map: str | None = None) -> dict:
    """The ``vitray.rayClusterSpec`` helper: a RayJob's ``rayClusterSpec`` and a RayService's ``rayClusterConfig``."""
    env = _env(values, release)
    head_mounts, head_volumes = _mounts_and_volumes(values, release, config_map)
    head = {"name": "ray-head", "image": _image(values), "imagePullPolicy": values["image"]["pullPolicy"],
            "ports": copy.deepcopy(RAY_PORTS), "resources": copy.deepcopy(values["head"]["resources"]),
            "securityContext": copy.deepcopy(values["securityContext"])}
    if env:
        head["env"] = copy.deepcopy(env)
    env_from = _env_from(values)
    if env_from:
        head["envFrom"] = copy.deepcopy(env_from)
    head["volumeMounts"] = head_mounts
    spec: dict[str, Any] = {"rayVersion": values["rayVersion"]}
    auto = values["autoscaling"]
    if auto["enabled"]:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {"idleTimeoutSeconds": int(auto["idleTimeoutSeconds"]),
                                     "resources": copy.deepcopy(auto["resources"]),
                                     "securityContext": copy.deepcopy(values["securityContext"])}
    if values["auth"]["mode"] == "token":
        spec["authOptions"] = {"mode": "token"}
    labels = selector_labels(values, release, component)
    spec["headGroupSpec"] = {
        "rayStartParams": {**{k: str(v) for k, v in values["head"]["rayStartParams"].items()}, "num-gpus": "0"},
        "template": {"metadata": {"labels": {**labels, "ray.io/group": "head"}},
                     "spec": _pod_spec(values, head, head_volumes)}}
    groups = []
    for g in values["workerGroups"]:
        mounts, volumes = _mounts_and_volumes(values, release, None)
        container = {"name": "ray-worker", "image": _image(values), "imagePullPolicy": values["image"]["pullPolicy"],
                     "resources": _resources(g["resources"], int(g.get("gpus", 0))),
                     "securityContext": copy.deepcopy(values["securityContext"])}
        if env:
            container["env"] = copy.deepcopy(env)
        if env_from:
            container["envFrom"] = copy.deepcopy(env_from)
        container["volumeMounts"] = mounts
        extra = {}
        if g.get("nodeSelector"):
            extra["nodeSelector"] = copy.deepcopy(g["nodeSelector"])
        if g.get("tolerations"):
            extra["tolerations"] = copy.deepcopy(g["tolerations"])
        groups.append({"groupName": g["name"], "replicas": int(g["replicas"]), "minReplicas": int(g["minReplicas"]),
                       "maxReplicas": int(g["maxReplicas"]), "rayStartParams": {},
                       "template": {"metadata": {"labels": {**labels, "ray.io/group": g["name"]}},
                                    "spec": _pod_spec(values, container, volumes, extra)}})
    spec["workerGroupSpecs"] = groups
    return spec


# ------------------------------------------------------------------------------------------------ objects
def job_name(values: dict, release: str) -> str:
    return f"{fullname(values, release)}-{values['job']['workload']}"


def run_config_map(values: dict, release: str) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _metadata(values, release, f"{job_name(values, release)}-config", "run-config"),
            "data": {"run.yaml": values["job"]["runConfig"]}}


def ray_job(values: dict, release: str) -> dict:
    job = values["job"]
    name = job_name(values, release)
    spec: dict[str, Any] = {
        "entrypoint": job["entrypoint"],
        "runtimeEnvYAML": yaml.safe_dump(job["runtimeEnv"], sort_keys=True),
        "submissionMode": job["submissionMode"],
        "shutdownAfterJobFinishes": bool(job["shutdownAfterJobFinishes"]),
        "ttlSecondsAfterFinished": int(job["ttlSecondsAfterFinished"]),
        "backoffLimit": int(job["backoffLimit"]),
    }
    if int(job["activeDeadlineSeconds"]) > 0:
        spec["activeDeadlineSeconds"] = int(job["activeDeadlineSeconds"])
    if job["submissionMode"] == "K8sJobMode":
        container = {"name": "ray-job-submitter", "image": _image(values),
                     "imagePullPolicy": values["image"]["pullPolicy"],
                     "resources": copy.deepcopy(job["submitter"]["resources"]),
                     "securityContext": copy.deepcopy(values["securityContext"])}
        pod = {"securityContext": copy.deepcopy(values["podSecurityContext"])}
        if values["imagePullSecrets"]:
            pod["imagePullSecrets"] = copy.deepcopy(values["imagePullSecrets"])
        pod.update({"restartPolicy": "Never", "containers": [container]})
        spec["submitterPodTemplate"] = {
            "metadata": {"labels": selector_labels(values, release, "submitter")}, "spec": pod}
    spec["rayClusterSpec"] = ray_cluster_spec(values, release, job["workload"], f"{name}-config")
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(values, release, name, job["workload"]),
            "spec": spec}


def ray_service(values: dict, release: str) -> dict:
    svc = values["service"]
    spec = {"upgradeStrategy": {"type": svc["upgradeStrategy"]},
            "serveConfigV2": yaml.safe_dump(svc["serveConfig"], sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(values, release, "serve")}
    return {"apiVersion": "ray.io/v1", "kind": "RayService",
            "metadata": _metadata(values, release, f"{fullname(values, release)}-serve", "serve"), "spec": spec}


def render(values: dict, release: str, namespace: str | None = None) -> list[dict]:
    """The objects ``vitray k8s`` creates: [ConfigMap, RayJob] for a job, [RayService] for serving."""
    values = merge(DEFAULTS, values)
    objs = []
    if values["job"]["enabled"]:
        objs += [run_config_map(values, release), ray_job(values, release)]
    if values["service"]["enabled"]:
        objs.append(ray_service(values, release))
    if namespace:
        for o in objs:
            o["metadata"]["namespace"] = namespace
    return objs


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (run.yaml, runtimeEnvYAML, serveConfigV2) as literal blocks, as kubectl users write them."""


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def dump_yaml(data, *, all_documents: bool = False) -> str:
    if all_documents:
        return yaml.dump_all(data, Dumper=_BlockDumper, sort_keys=False, width=120)
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, width=120)
