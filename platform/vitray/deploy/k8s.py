"""``vitray k8s submit``: create a run's KubeRay objects through the Kubernetes API and watch them to the end.

Objects go through ``CustomObjectsApi`` (RayJob, RayService) and ``CoreV1Api`` (the run-config ConfigMap, owned by
the RayJob so it is garbage-collected with it), always with strict field validation: a field the API server does
not know fails the request instead of being dropped. The watch polls the RayJob's ``status.jobDeploymentStatus``
and ``status.jobStatus`` (a RayService's Ready condition) and prints each change until a terminal state.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

from vitray.config import ConfigError

__all__ = ["GROUP", "VERSION", "K8sError", "clients", "create", "watch_job", "watch_service", "JobOutcome",
           "TERMINAL_DEPLOYMENT"]

GROUP, VERSION = "ray.io", "v1"
PLURALS = {"RayJob": "rayjobs", "RayService": "rayservices"}
# KubeRay's JobDeploymentStatus: Complete and Failed end a RayJob; ValidationFailed ends it before any cluster.
TERMINAL_DEPLOYMENT = ("Complete", "Failed", "ValidationFailed")
TERMINAL_JOB = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 5.0  # seconds between status reads


class K8sError(RuntimeError):
    """The API server could not be reached or failed a request: one line for the CLI (exit 1)."""


def clients(context: str | None = None):
    """(CustomObjectsApi, CoreV1Api, default namespace) from the kubeconfig (or the pod's service account)."""
    from kubernetes import client, config

    try:
        config.load_kube_config(context=context)
        contexts, active = config.list_kube_config_contexts()
        chosen = next((c for c in contexts or [] if c.get("name") == context), None) if context else active
        namespace = (chosen or {}).get("context", {}).get("namespace") or "default"
    except Exception as kube_err:  # noqa: BLE001 - fall back to the in-cluster service account
        try:
            config.load_incluster_config()
        except Exception:  # noqa: BLE001
            raise K8sError(f"no Kubernetes credentials: {str(kube_err).splitlines()[0][:200]} (set KUBECONFIG, or "
                           "run inside a pod with a service account)") from None
        try:
            namespace = open("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read().strip()
        except OSError:
            namespace = "default"
    return client.CustomObjectsApi(), client.CoreV1Api(), namespace


def _api_error(err, kind: str, name: str, namespace: str) -> Exception:
    """409 / 422 / 400 / 403 as sentences naming the object; anything else as a K8sError."""
    status = getattr(err, "status", None)
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or getattr(err, "reason", "") or str(err)
    causes = [f"{c.get('field', '')}: {c.get('message', '')}".strip(": ")
              for c in (body.get("details") or {}).get("causes") or []]
    where = f"{kind} {namespace}/{name}"
    if status == 409:
        return ConfigError(f"{where} already exists: delete it (kubectl delete {kind.lower()} {name} -n {namespace}) "
                           "or choose another kubernetes.name")
    if status in (400, 422):
        detail = "; ".join(causes) or message
        reason = "Invalid" if status == 422 else "Bad Request"
        return ConfigError(f"{where} was rejected by the API server ({status} {reason}): {detail[:800]}")
    if status == 404:
        return K8sError(f"{where}: the API server does not serve {GROUP}/{VERSION} {kind} ({message[:200]}): is the "
                        "KubeRay operator (>= 1.5) installed? kubectl get crd rayjobs.ray.io")
    if status in (401, 403):
        return K8sError(f"{where}: not allowed ({status}): {message[:300]} (the chart's submitter ServiceAccount has "
                        "the rights vitray needs)")
    return K8sError(f"{where}: API server error {status or ''}: {message[:300]}".replace("  ", " "))


def create(objects: list[dict], namespace: str, custom, core) -> dict:
    """Create the RayJob/RayService first, then its ConfigMap owned by it; returns the created custom object."""
    from kubernetes.client.rest import ApiException

    main = next(o for o in objects if o["kind"] in PLURALS)
    kind, name = main["kind"], main["metadata"]["name"]
    try:
        created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], main,
                                                         field_validation="Strict")
    except ApiException as err:
        raise _api_error(err, kind, name, namespace) from None
    owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "name": name,
             "uid": created["metadata"]["uid"], "controller": False, "blockOwnerDeletion": False}
    for obj in objects:
        if obj is main:
            continue
        body = {**obj, "metadata": {**obj["metadata"], "ownerReferences": [owner]}}
        try:
            try:
                core.create_namespaced_config_map(namespace, body, field_validation="Strict")
            except ApiException as err:
                if err.status != 409:
                    raise
                # left by a run of the same name that was deleted without its owner: replace it
                core.replace_namespaced_config_map(obj["metadata"]["name"], namespace, body, field_validation="Strict")
        except ApiException as err:
            # without its run config the RayJob's head would wait forever on the volume: take the RayJob back
            try:
                custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
            except ApiException:
                pass
            raise _api_error(err, obj["kind"], obj["metadata"]["name"], namespace) from None
    return created


@dataclass
class JobOutcome:
    deployment_status: str
    job_status: str
    message: str

    @property
    def succeeded(self) -> bool:
        return self.deployment_status == "Complete" and self.job_status == "SUCCEEDED"


def _statuses(custom, namespace: str, kind: str, name: str, timeout_s: float | None):
    """Each ``status`` of the object, POLL_S apart: deleted (404) ends the watch with a K8sError, five failed reads
    in a row with the API error, the timeout with a line saying the object keeps running."""
    from kubernetes.client.rest import ApiException

    start = time.monotonic()
    misses = 0
    while True:
        try:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name)
            misses = 0
        except ApiException as err:
            if err.status == 404:
                raise K8sError(f"{kind} {namespace}/{name} was deleted while being watched") from None
            misses += 1
            if misses >= 5:
                raise _api_error(err, kind, name, namespace) from None
            time.sleep(POLL_S)
            continue
        yield obj.get("status") or {}
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise K8sError(f"{kind} {namespace}/{name} not finished after {timeout_s:.0f}s (it keeps running: "
                           f"kubectl get {kind.lower()} {name} -n {namespace})")
        time.sleep(POLL_S)


def watch_job(custom, namespace: str, name: str, *, timeout_s: float | None = None, out=None) -> JobOutcome:
    """Follow a RayJob until KubeRay says it is over; prints one line per change of (deployment, job) status."""
    out = out or sys.stdout
    seen = None
    for status in _statuses(custom, namespace, "RayJob", name, timeout_s):
        dep, job = status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-"
        if (dep, job) != seen:
            seen = (dep, job)
            extra = f" cluster {status['rayClusterName']}" if status.get("rayClusterName") else ""
            extra += f" dashboard {status['dashboardURL']}" if status.get("dashboardURL") else ""
            out.write(f"[vitray] RayJob {namespace}/{name}: {dep} / {job}{extra}\n")
            out.flush()
        if dep in TERMINAL_DEPLOYMENT:  # KubeRay never leaves ValidationFailed, with or without a cluster
            return JobOutcome(dep, job, status.get("message") or status.get("reason") or "")
    raise AssertionError("unreachable")


def watch_service(custom, namespace: str, name: str, *, timeout_s: float | None = 1800, out=None) -> bool:
    """Follow a RayService until its Ready condition is True (True) or the timeout passes (K8sError)."""
    out = out or sys.stdout
    seen = None
    for status in _statuses(custom, namespace, "RayService", name, timeout_s):
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        state = (ready.get("status", "Unknown"), ready.get("reason", status.get("serviceStatus", "")))
        if state != seen:
            seen = state
            out.write(f"[vitray] RayService {namespace}/{name}: Ready={state[0]} {state[1]}\n")
            out.flush()
        if state[0] == "True":
            return True
    raise AssertionError("unreachable")
