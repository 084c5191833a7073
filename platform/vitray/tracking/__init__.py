"""vitray tracking: MLflow tracking URIs and model URIs (`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN/model`,
or a local export folder) resolved to a local export folder."""
from .uris import default_tracking_uri, resolve_model_uri, use_tracking_uri

__all__ = ["default_tracking_uri", "resolve_model_uri", "use_tracking_uri"]
