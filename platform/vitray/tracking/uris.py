"""Where MLflow is, and how a model URI becomes a local export folder.

With no ``tracking.uri`` and no ``MLFLOW_TRACKING_URI``, vitray uses a sqlite file under the vitray home
(``<home>/mlflow/mlflow.db``, artifacts in ``<home>/mlflow/artifacts``): no server to start.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from vitray.config import ConfigError, is_model_uri, vitray_home

__all__ = ["default_tracking_uri", "client_for", "tracking_scope", "resolve_model_uri", "load_model", "pin_model_uri",
           "ModelUriError", "onnx_artifact_uri", "ONNX_TAG"]


class ModelUriError(ConfigError):
    pass


def default_tracking_uri(configured: str | None = None) -> str:
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = vitray_home() / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def client_for(uri: str):
    """An MlflowClient whose registry is the same store as its tracking (MlflowClient(uri) alone takes the registry
    from the process-wide setting, which another run may have pointed elsewhere)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def tracking_scope(uri: str):
    """Point MLflow's process-wide tracking and registry URIs at ``uri`` for the fluent calls inside (log_model,
    register_model, download_artifacts, pyfunc.load_model), then put back what was there, environment included:
    ``mlflow.set_tracking_uri`` also exports $MLFLOW_TRACKING_URI, which would otherwise leak into every later
    default in this process and into its subprocesses."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None),
             os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield uri
    finally:
        if saved[0] is None:
            mlflow.set_tracking_uri(None)  # unsets the variable too
        else:
            mlflow.set_tracking_uri(saved[0])
        registry_utils._registry_uri = saved[1]
        for key, value in (("MLFLOW_TRACKING_URI", saved[2]), ("MLFLOW_REGISTRY_URI", saved[3])):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _find_export(root: Path) -> Path | None:
    from vitray.export_format import EXPORT_META

    if (root / EXPORT_META).is_file():
        return root
    hits = sorted(root.rglob(EXPORT_META))
    return hits[0].parent if hits else None


ONNX_TAG = "vitray.onnx"  # on a registered model version: the artifact URI of its ONNX export (`vitray export`)


def onnx_artifact_uri(uri: str, tracking_uri: str | None = None) -> str:
    """Where the ONNX export of a registered version lives (``models:/NAME@ALIAS`` or ``models:/NAME/V`` -> the
    ``runs:/`` URI in its ``vitray.onnx`` tag); other URIs are returned as they are (a folder or run artifact that
    is itself an ONNX export)."""
    m = _REGISTRY_URI.match(uri)
    if not m:
        return uri
    from mlflow.exceptions import MlflowException

    pin = pin_model_uri(uri, tracking_uri)
    try:
        mv = client_for(default_tracking_uri(tracking_uri)).get_model_version(pin["name"], pin["version"])
    except MlflowException as err:
        raise ModelUriError(f"model {uri}: {str(err).splitlines()[0]}") from None
    found = (mv.tags or {}).get(ONNX_TAG)
    if not found:
        raise ModelUriError(f"model {uri}: version {pin['version']} has no ONNX export; write and attach one with "
                            f"`vitray export {pin['uri']} --format onnx -o DIR` (add --int8 for the int8 graph)")
    return found


def resolve_model_uri(uri: str, tracking_uri: str | None = None, dest: str | None = None, progress: bool = False,
                      runtime: str = "torch") -> Path:
    """A local export folder for ``uri``: itself when local, else the registered/logged model's artifacts
    downloaded from MLflow (``dest`` or a temporary folder). ``runtime="onnx"``: a registered version's ONNX export
    (:func:`onnx_artifact_uri`). Errors name the URI and what is wrong."""
    if runtime == "onnx":
        uri = onnx_artifact_uri(uri, tracking_uri)
    if not is_model_uri(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise ModelUriError(f"model {uri}: no such file or folder")
        return path
    import mlflow
    from mlflow.exceptions import MlflowException

    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "true" if progress else "false"  # a bar per small file is noise
    try:
        with tracking_scope(default_tracking_uri(tracking_uri)):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dest))
    except MlflowException as err:
        raise ModelUriError(f"model {uri}: {str(err).splitlines()[0]}") from None
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
    found = _find_export(local)
    if found is None:
        raise ModelUriError(f"model {uri}: downloaded to {local}, but it holds no vitray export (vitray_model.json)")
    return found


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu"):
    """The one loader for fine-tuning, serving and scoring: any model URI -> (model in eval mode, export meta)."""
    from vitray.models.export import load_export

    return load_export(resolve_model_uri(uri, tracking_uri), device=device)


_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def pin_model_uri(uri: str, tracking_uri: str | None = None) -> dict:
    """Where a registry URI points now: ``models:/NAME@ALIAS`` -> ``{"uri": "models:/NAME/7", "name": NAME,
    "version": "7", "alias": ALIAS, "source": uri}``. A version URI pins to itself; other URIs (``runs:/``, a local
    folder) have no registry version and are returned as they are. Serving loads the pinned URI, so every replica
    runs the same version until the next explicit reload, whatever the alias does in between."""
    m = _REGISTRY_URI.match(uri)
    if not m:
        return {"uri": uri, "name": None, "version": None, "alias": None, "source": uri}
    name, alias, version = m["name"], m["alias"], m["version"]
    if alias is not None:
        from mlflow.exceptions import MlflowException

        try:
            version = str(client_for(default_tracking_uri(tracking_uri)).get_model_version_by_alias(name, alias).version)
        except MlflowException as err:
            raise ModelUriError(f"model {uri}: {str(err).splitlines()[0]}") from None
    return {"uri": f"models:/{name}/{version}", "name": name, "version": str(version), "alias": alias, "source": uri}
