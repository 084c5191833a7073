"""vitray serve: Ray Serve deployments behind one HTTP API.

``app`` builds and runs the application (``vitray serve``, ``vitray serve reload``, ``vitray serve config`` and the
import path ``vitray.serve.app:build_app``), ``model`` is the batched model deployment (any task), ``ingress`` the FastAPI
routes. Nothing here imports the training stack: a serving image needs no DeepSpeed.
"""
from .app import APP_NAME, IMPORT_PATH, build_app, reload, run, serve_config

__all__ = ["APP_NAME", "IMPORT_PATH", "build_app", "run", "reload", "serve_config"]
