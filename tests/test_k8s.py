"""`vitray k8s render|values|submit`.

No Kubernetes API server runs here: `submit` is exercised through the real CLI in-process against a stand-in at the
CustomObjectsApi / CoreV1Api boundary (the calls vitray makes, with the ApiException bodies a real API server sends
for 409, 422 and strict field validation), which scripts the RayJob's status as KubeRay would move it.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes.client.rest import ApiException

from k8s_tools import crd_schemas, validate
from vitray.cli import main
from vitray.deploy import k8s

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "jobs" / "configs" / "k8s_digits.yaml")


def _api_exception(status: int, reason: str, message: str, causes: list | None = None) -> ApiException:
    err = ApiException(status=status, reason=reason)
    err.body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                           "reason": reason, "code": status,
                           **({"details": {"causes": causes}} if causes else {})})
    return err


class StandInCustomObjects:
    """kubernetes.client.CustomObjectsApi as far as vitray uses it."""

    def __init__(self, statuses=(), create_error: ApiException | None = None):
        self.statuses, self.create_error = list(statuses), create_error
        self.created, self.gets = [], 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, field_validation=None):
        assert (group, version, plural) == ("ray.io", "v1", {"RayJob": "rayjobs", "RayService": "rayservices"}[body["kind"]])
        assert field_validation == "Strict"
        assert body["metadata"]["namespace"] == namespace
        if self.create_error:
            raise self.create_error
        self.created.append(body)
        return {**body, "metadata": {**body["metadata"], "uid": "0b8f-rayjob-uid", "resourceVersion": "1"}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted = getattr(self, "deleted", []) + [(plural, name)]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        step = self.statuses[min(self.gets, len(self.statuses) - 1)]
        self.gets += 1
        if isinstance(step, Exception):
            raise step
        return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": name}, "status": step}


class StandInCore:
    def __init__(self, create_error: ApiException | None = None, replace_error: ApiException | None = None):
        self.config_maps, self.replaced = [], []
        self.create_error, self.replace_error = create_error, replace_error

    def create_namespaced_config_map(self, namespace, body, field_validation=None):
        assert field_validation == "Strict"
        if self.create_error:
            raise self.create_error
        self.config_maps.append(body)
        return body

    def replace_namespaced_config_map(self, name, namespace, body, field_validation=None):
        assert field_validation == "Strict" and name == body["metadata"]["name"]
        if self.replace_error:
            raise self.replace_error
        self.replaced.append(body)
        return body


@pytest.fixture
def cluster(monkeypatch):
    def install(custom, core=None):
        core = core or StandInCore()
        monkeypatch.setattr(k8s, "clients", lambda context=None: (custom, core, "team-a"))
        monkeypatch.setattr(k8s, "POLL_S", 0.0)
        return custom, core
    return install


RUNNING = [{}, {"jobDeploymentStatus": "Initializing", "rayClusterName": "vitray-train-x7k2p"},
           {"jobDeploymentStatus": "Running", "jobStatus": "PENDING", "rayClusterName": "vitray-train-x7k2p"},
           {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "vitray-train-x7k2p",
            "dashboardURL": "vitray-train-x7k2p-head-svc.team-a.svc.cluster.local:8265"},
           {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "vitray-train-x7k2p"}]


def test_submit_wait_creates_the_rayjob_and_its_configmap_and_follows_it_to_success(cluster, capsys):
    custom, core = cluster(StandInCustomObjects(RUNNING + [
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "rayClusterName": "vitray-train-x7k2p",
         "message": "Job finished successfully."}]))
    assert main(["k8s", "submit", DIGITS, "--wait"]) == 0
    out = capsys.readouterr().out
    job = custom.created[0]
    assert job["kind"] == "RayJob" and job["metadata"] == {**job["metadata"], "name": "vitray-train", "namespace": "team-a"}
    validate(job, crd_schemas())
    (cm,) = core.config_maps
    assert cm["metadata"]["name"] == "vitray-train-config"
    assert cm["metadata"]["ownerReferences"][0] == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "vitray-train",
                                                    "uid": "0b8f-rayjob-uid", "controller": False,
                                                    "blockOwnerDeletion": False}
    run = yaml.safe_load(cm["data"]["run.yaml"])
    assert run["data"]["path"] == "/mnt/vitray/digits"
    assert run["cluster"]["resource_wait_s"] == 600  # KubeRay's autoscaler may add the pods the plan needs
    lines = [line for line in out.splitlines() if line.startswith("[vitray] RayJob team-a/vitray-train:")]
    assert [line.split(": ", 1)[1].split(" cluster")[0] for line in lines] == [
        "New / -", "Initializing / -", "Running / PENDING", "Running / RUNNING", "Complete / SUCCEEDED"]
    assert "dashboard vitray-train-x7k2p-head-svc" in out
    assert "ended: Complete / SUCCEEDED" in out


def test_submit_wait_exits_1_when_the_job_fails_and_names_the_reason(cluster, capsys):
    cluster(StandInCustomObjects(RUNNING[:3] + [
        {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed",
         "message": "Job entrypoint command failed with exit code 2"}]))
    assert main(["k8s", "submit", DIGITS, "--wait", "--namespace", "ml"]) == 1
    out = capsys.readouterr().out
    assert "RayJob ml/vitray-train ended: Failed / FAILED: Job entrypoint command failed with exit code 2" in out


@pytest.mark.parametrize("cluster_name", [None, "vitray-train-x7k2p"])
def test_validation_failed_is_terminal_before_or_after_a_cluster(cluster, capsys, cluster_name):
    status = {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed",
              "message": "The RayJob metadata is invalid: name too long"}
    cluster(StandInCustomObjects([{}, {**status, **({"rayClusterName": cluster_name} if cluster_name else {})}]))
    assert main(["k8s", "submit", DIGITS, "--wait"]) == 1
    assert "ValidationFailed / -: The RayJob metadata is invalid" in capsys.readouterr().out


def test_a_rayjob_deleted_while_watched_fails_with_a_message(cluster, capsys):
    cluster(StandInCustomObjects(RUNNING[:2] + [_api_exception(404, "NotFound", 'rayjobs.ray.io "vitray-train" not found')]))
    assert main(["k8s", "submit", DIGITS, "--wait"]) == 1
    assert "was deleted while being watched" in capsys.readouterr().err


def test_conflict_409_says_it_exists_and_how_to_clear_it(cluster, capsys):
    custom, core = cluster(StandInCustomObjects(create_error=_api_exception(
        409, "AlreadyExists", 'rayjobs.ray.io "vitray-train" already exists')))
    assert main(["k8s", "submit", DIGITS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RayJob team-a/vitray-train already exists" in err
    assert "kubectl delete rayjob vitray-train -n team-a" in err and "kubernetes.name" in err
    assert not core.config_maps  # nothing half-created


def test_invalid_422_names_the_field_the_api_server_rejected(cluster, capsys):
    cluster(StandInCustomObjects(create_error=_api_exception(
        422, "Invalid", 'RayJob.ray.io "vitray-train" is invalid: spec.rayClusterSpec.workerGroupSpecs[0].replicas',
        [{"reason": "FieldValueInvalid", "field": "spec.rayClusterSpec.workerGroupSpecs[0].replicas",
          "message": "Invalid value: -1: should be greater than or equal to 0"}])))
    assert main(["k8s", "submit", DIGITS]) == 2
    err = capsys.readouterr().err
    assert "was rejected by the API server (422 Invalid): spec.rayClusterSpec.workerGroupSpecs[0].replicas: " \
           "Invalid value: -1" in err and "Traceback" not in err


def test_strict_field_validation_400_is_reported_as_a_rejection(cluster, capsys):
    cluster(StandInCustomObjects(create_error=_api_exception(
        400, "BadRequest", 'strict decoding error: unknown field "spec.rayClusterSpec.headGroupSpec.rayStartParam"')))
    assert main(["k8s", "submit", DIGITS]) == 2
    assert 'unknown field "spec.rayClusterSpec.headGroupSpec.rayStartParam"' in capsys.readouterr().err


def test_no_kuberay_crd_404_on_create_points_at_the_operator(cluster, capsys):
    cluster(StandInCustomObjects(create_error=_api_exception(404, "NotFound", "the server could not find the "
                                                                             "requested resource")))
    assert main(["k8s", "submit", DIGITS]) == 1
    assert "is the KubeRay operator (>= 1.5) installed?" in capsys.readouterr().err


def test_submit_a_rayservice_waits_for_ready(cluster, monkeypatch, capsys):
    class Service(StandInCustomObjects):
        def get_namespaced_custom_object(self, group, version, namespace, plural, name):
            assert plural == "rayservices"
            self.gets += 1
            ready = "True" if self.gets >= 3 else "False"
            return {"status": {"conditions": [{"type": "Ready", "status": ready,
                                               "reason": "NonZeroServeEndpoints" if ready == "True" else "Initializing"}]}}

    custom, core = cluster(Service())
    assert main(["k8s", "submit", str(ROOT / "jobs" / "configs" / "serve_digits.yaml"), "--wait"]) == 0
    assert custom.created[0]["kind"] == "RayService" and not core.config_maps
    assert "RayService team-a/vitray-serve is ready" in capsys.readouterr().out


def test_render_and_values_print_yaml_without_importing_torch(tmp_path):
    code = ("import sys; from vitray.cli import main; "
            f"rc = main(['k8s', 'render', {DIGITS!r}, '-o', {str(tmp_path / 'job.yaml')!r}]); "
            f"rc += main(['k8s', 'values', {str(ROOT / 'jobs/configs/serve_digits.yaml')!r}, '-o', "
            f"{str(tmp_path / 'values.yaml')!r}]); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'deploy imported torch'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    objs = list(yaml.safe_load_all((tmp_path / "job.yaml").read_text()))
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob"]
    assert yaml.safe_load(objs[1]["spec"]["runtimeEnvYAML"]) == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    values = yaml.safe_load((tmp_path / "values.yaml").read_text())
    assert values["service"]["enabled"] is True and values["job"] == {"enabled": False}
    assert values["service"]["serveConfig"]["applications"][0]["import_path"] == "vitray.serve.app:build_app"


def test_render_usage_errors_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    assert main(["k8s", "render", str(empty)]) == 2
    assert "kubernetes.workload: nothing to run" in capsys.readouterr().err
    assert main(["k8s", "render", DIGITS, "--set", "kubernetes.worker_groups=[{name: gpu, replicas: 3, "
                                                   "max_replicas: 2}]"]) == 2
    assert "min_replicas <= replicas <= max_replicas" in capsys.readouterr().err
    assert main(["k8s", "render", DIGITS, "--set", "kubernetes.submission_mode=Interactive"]) == 2
    assert "kubernetes.submission_mode" in capsys.readouterr().err


def test_a_leftover_configmap_is_replaced_and_a_refused_one_takes_the_rayjob_back(cluster, capsys):
    custom, core = cluster(StandInCustomObjects(), StandInCore(create_error=_api_exception(
        409, "AlreadyExists", 'configmaps "vitray-train-config" already exists')))
    assert main(["k8s", "submit", DIGITS]) == 0
    assert [b["metadata"]["name"] for b in core.replaced] == ["vitray-train-config"]
    assert core.replaced[0]["metadata"]["ownerReferences"][0]["uid"] == "0b8f-rayjob-uid"
    capsys.readouterr()
    custom, core = cluster(StandInCustomObjects(), StandInCore(create_error=_api_exception(
        403, "Forbidden", 'configmaps is forbidden: User "ci" cannot create resource "configmaps"')))
    assert main(["k8s", "submit", DIGITS]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ConfigMap team-a/vitray-train-config: not allowed (403)" in err
    assert custom.deleted == [("rayjobs", "vitray-train")]  # no RayJob left waiting for a config that never came


def test_a_rayservice_deleted_while_watched_is_one_line(cluster, capsys):
    class Gone(StandInCustomObjects):
        def get_namespaced_custom_object(self, group, version, namespace, plural, name):
            raise _api_exception(404, "NotFound", f'rayservices.ray.io "{name}" not found')

    cluster(Gone())
    assert main(["k8s", "submit", str(ROOT / "jobs" / "configs" / "serve_digits.yaml"), "--wait"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RayService team-a/vitray-serve was deleted while being watched" in err


def test_bad_name_is_a_usage_error(capsys):
    assert main(["k8s", "render", DIGITS, "--name", "Bad_Name"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--name 'Bad_Name'" in err


def test_shell_entrypoints_are_wrapped_for_kuberays_submitter_and_serve_groups_cover_every_model():
    from vitray.config import load_config
    from vitray.deploy.values import chart_values, job_entrypoint

    assert job_entrypoint("python /home/ray/vitray/jobs/train.py /etc/vitray/run.yaml") == \
        "python /home/ray/vitray/jobs/train.py /etc/vitray/run.yaml"
    wrapped = job_entrypoint("vitray data pack - /d --format sklearn-digits && python t.py it's.yaml")
    import shlex

    assert shlex.split(wrapped) == ["bash", "-ec", "vitray data pack - /d --format sklearn-digits && python t.py it's.yaml"]
    assert job_entrypoint("bash -ec 'a && b'") == "bash -ec 'a && b'"
    cfg = load_config(ROOT / "jobs" / "configs" / "serve_digits.yaml",
                      ["serve.models=[{name: a, uri: 'models:/a@champion'}, {name: b, uri: 'models:/b@champion'}]",
                       "serve.gpus_per_replica=1"])
    (group,) = chart_values(cfg)["workerGroups"]
    assert group["name"] == "gpu" and group["gpus"] == 1
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 2, 4)  # 2 models x 1..2 replicas


def test_job_address_ignores_a_gcs_ray_address(monkeypatch):
    from vitray.deploy.ray_jobs import DEFAULT_ADDRESS, job_address

    monkeypatch.setenv("RAY_ADDRESS", "vitray-head-svc:6379")  # what KubeRay sets inside Ray pods
    assert job_address(None) == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert job_address(None) == "http://head:8265"


def test_watch_timeout_leaves_the_job_running_and_says_so(cluster, capsys):
    custom, _ = cluster(StandInCustomObjects(RUNNING))
    assert main(["k8s", "submit", DIGITS, "--wait", "--timeout", "0"]) == 1
    err = capsys.readouterr().err
    assert "RayJob team-a/vitray-train not finished after 0s (it keeps running: kubectl get rayjob vitray-train" in err
    assert not getattr(custom, "deleted", [])
