"""The MLflow pyfunc of a vitray model.

``predict`` takes a pandas DataFrame with a column ``image`` holding encoded image bytes (JPEG/PNG/WebP/...) or
decoded uint8 arrays (H, W, 3), one row per image, and returns one row per image with the columns of the model's
task (its inference head, ``vitray.tasks.<task>.infer``): classification ``label`` (int), ``name`` and ``probs``;
segmentation ``mask`` (PNG bytes of class ids at the original size), ``width``, ``height`` and ``class_areas``.
The model's artifacts are a vitray export folder (model-only safetensors weights, task, architecture, class names,
preprocessing), so nothing else is needed to serve it.

A generator (a task whose model takes prompts) takes a column ``prompt`` instead, with optional ``seed`` (default:
the row number), and returns ``image`` (PNG bytes), ``prompt`` and ``seed``; ``params`` may set ``steps`` and
``guidance``. It is logged as "models from code"
(:mod:`vitray.tracking.pyfunc_model`): no pickled Python objects.
"""
from __future__ import annotations

import pandas as pd

try:
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency; keep the module importable for docs tools
    PythonModel = object

__all__ = ["VitrayPyfuncModel"]


class VitrayPyfuncModel(PythonModel):
    def load_context(self, context):
        from vitray.export_format import read_export_meta
        from vitray.tasks import get_task

        export = context.artifacts["export"]
        self.generator = None
        if get_task(read_export_meta(export)["task"]).inputs == "prompt":
            from vitray.tasks.generation.generator import Generator

            self.generator = Generator(export)
        else:
            from vitray.predict import Predictor

            self.predictor = Predictor.from_export(export)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if self.generator is not None:
            return self.generator.frame(pd.DataFrame(model_input), **(params or {}))
        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError(f"input needs a column 'image' (encoded bytes or uint8 arrays); got {list(model_input.columns)}")
            images = list(model_input["image"])
        elif isinstance(model_input, dict) and "image" in model_input:
            images = list(model_input["image"])
        else:
            images = list(model_input)
        return self.predictor.frame(images)
