"""vitray tracking: MLflow runs (driver side and rank-0 worker logging), the model registry with its
champion/challenger gate, the pyfunc flavour, and model URIs (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/RUN/model`` or a local export folder) resolved to a local export folder."""
from .runs import TrackingError, check_reachable, end_run, start_run
from .uris import ModelUriError, default_tracking_uri, load_model, resolve_model_uri, tracking_scope

__all__ = ["default_tracking_uri", "resolve_model_uri", "load_model", "tracking_scope", "ModelUriError",
           "TrackingError", "check_reachable", "start_run", "end_run"]
