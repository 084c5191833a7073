"""The model deployment: one per served model, loaded from its URI, batched with ``@serve.batch``, whatever its task
(the task's inference head, found by the task name in the export, prepares images and turns outputs into answers).

A request's image is decoded and resized on a thread pool in the request path (or arrives already decoded from the
ingress), so decoding never runs inside the batch; the batch only normalises and runs the forward, on its own
thread, so the event loop keeps admitting requests while a batch computes. The model comes from ``user_config``
(``{"model": <pinned URI dict>, "max_batch_size": N, "batch_wait_timeout_s": T}``): a new ``user_config`` loads the
new version beside the old one and swaps it in; requests already admitted finish on the version they started with.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ray import serve

from pydantic import ValidationError

from vitray.config import MAX_PIXELS
from vitray.data.decode import DecodeError
from vitray.predict import InputError, Predictor

__all__ = ["ModelDeployment", "ModelRunner", "LoadedModel", "error_status"]

log = logging.getLogger("ray.serve")
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def params_error(err: ValidationError) -> str:
    """A route parameter's validation error as one line naming the parameter and what was given."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg')} (given {e.get('input')!r})" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid parameters"


def error_status(err: Exception) -> int:
    """413 for an image over the pixel cap (a decompression bomb), 400 for anything else undecodable."""
    return 413 if isinstance(err, DecodeError) and str(err).startswith("too many pixels") else 400


@dataclass
class LoadedModel:
    """One loaded version. ``key`` identifies it: crops prepared for another key are re-prepared, never mixed."""

    predictor: Predictor
    pin: dict
    key: str

    @property
    def info(self) -> dict:
        meta = self.predictor.meta
        return {"task": self.predictor.task, "uri": self.pin["source"], "version": self.pin["version"],
                "alias": self.pin["alias"], "registered_model": self.pin["name"], "key": self.key,
                "classes": self.predictor.class_names, "num_classes": len(self.predictor.class_names),
                "input_size": self.predictor.input_size, "architecture": meta["model"]["name"],
                "precision": self.predictor.precision, "device": str(self.predictor.device),
                "runtime": self.predictor.runtime,
                "preprocessing": meta["preprocessing"], "metrics": meta.get("metrics") or {}}


class ModelRunner:
    """The model side of serving, usable in any replica: as its own deployment (:class:`ModelDeployment`, behind the
    router) or inside the ingress replica when only one model is served (no extra hop)."""

    def __init__(self, name: str, tracking_uri: str | None = None, precision: str = "auto",
                 max_pixels: int | None = MAX_PIXELS, decode_threads: int = 2, task: str | None = None,
                 runtime: str = "torch"):
        import ray

        self.name, self.tracking_uri, self.precision, self.max_pixels = name, tracking_uri, precision, max_pixels
        self.task = task  # None: whatever the export's task is
        self.runtime = runtime  # torch, or onnx (ONNX Runtime on CPU: torch is never imported)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.threads = max(1, int(cpus))
        self.device = "cpu"
        if runtime == "torch":
            import torch

            torch.set_num_threads(self.threads)
            self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="vitray-decode")
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="vitray-forward")
        self._current: LoadedModel | None = None
        self._reload_lock = asyncio.Lock()
        self._batching: dict = {}
        try:
            from ray.serve.metrics import Histogram

            self._batch_metric = Histogram("vitray_serve_batch_size", description="images per model forward",
                                           boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("model",))
            self._batch_metric.set_default_tags({"model": name})
        except Exception:  # noqa: BLE001 - metrics are optional (no metrics agent in some test setups)
            self._batch_metric = None

    # ------------------------------------------------------------------------------------------ model versions
    def _load(self, pin: dict) -> LoadedModel:
        from vitray.tracking.uris import resolve_model_uri

        t0 = time.time()
        from vitray.export_format import read_export_meta
        from vitray.tasks import get_task

        with tempfile.TemporaryDirectory(prefix=f"vitray-serve-{self.name}-") as tmp:
            folder = resolve_model_uri(pin["uri"], self.tracking_uri, dest=tmp, runtime=self.runtime)
            if get_task(read_export_meta(folder)["task"]).inputs == "prompt":  # a generator: prompts in
                from vitray.tasks.generation.generator import Generator

                predictor = Generator(folder, device=self.device, width=self._batching.get("max_batch_size", 16))
            else:
                predictor = Predictor.from_export(folder, runtime=self.runtime, threads=self.threads,
                                                  device=self.device, precision=self.precision,
                                                  max_pixels=self.max_pixels)
        meta = predictor.meta
        if self.task and meta["task"] != self.task:
            raise ValueError(f"model {self.name} ({pin['source']}): a {meta['task']} model, configured as {self.task}")
        size = predictor.input_size
        if hasattr(predictor, "generate"):  # warm-up: the first call is slow
            predictor.generate([predictor.example_prompt], [0], steps=1)
        else:
            predictor.forward(np.zeros((2, 3, size, size), np.uint8))
        # the key names what a crop depends on (the version and its preprocessing), the same in every replica
        digest = hashlib.sha256(json.dumps(meta["preprocessing"], sort_keys=True).encode()).hexdigest()[:12]
        loaded = LoadedModel(predictor, pin, key=f"{pin['uri']}#{digest}")
        log.info("vitray: model %s loaded %s (version %s) in %.1fs, %s", self.name, pin["uri"], pin["version"],
                 time.time() - t0, predictor.precision)
        return loaded

    async def reconfigure(self, user_config: dict) -> None:
        """Serve calls this at start and whenever ``user_config`` changes (``vitray serve reload``)."""
        from vitray.tracking.uris import pin_model_uri

        self._batching = {"max_batch_size": int(user_config.get("max_batch_size", 16)),
                          "batch_wait_timeout_s": float(user_config.get("batch_wait_timeout_s", 0.01))}
        for batched in (self.predict_batch, self.generate_batch):
            batched.set_max_batch_size(self._batching["max_batch_size"])
            batched.set_batch_wait_timeout_s(self._batching["batch_wait_timeout_s"])
        loop = asyncio.get_running_loop()
        async with self._reload_lock:
            pin = user_config.get("model") or {}
            if not pin.get("version") and pin.get("source"):  # a config file with an alias URI: resolve it here
                pin = await loop.run_in_executor(None, pin_model_uri, pin["source"], self.tracking_uri)
            if self._current is not None and self._current.pin["uri"] == pin["uri"] and pin.get("version"):
                return  # same version: only the batching settings changed
            self._current = await loop.run_in_executor(None, self._load, pin)  # old version serves meanwhile

    # ------------------------------------------------------------------------------------------------ requests
    def info(self) -> dict:
        if self._current is None:
            return {"name": self.name, "ready": False}
        return {"name": self.name, "ready": True, **self._current.info, **self._batching}

    async def answer(self, image, params: dict, key: str | None = None) -> dict:
        """``image``: encoded bytes, or a (uint8 (3, S, S) input, original (height, width)) pair prepared by the
        ingress for model ``key``; ``params``: the route's query parameters. Returns a JSON-ready dict; bad input
        comes back as ``{"error", "status"}``, never as an exception."""
        current = self._current
        if isinstance(image, dict):  # a prompt (a generator's route)
            return await self._generate(current, image)
        head = current.predictor.head
        try:
            parsed = head.Params.model_validate(params)
        except ValidationError as err:
            return {"error": params_error(err), "status": 400}
        if isinstance(image, (bytes, bytearray, memoryview)):
            try:
                crop, size = await asyncio.get_running_loop().run_in_executor(self._decode, current.predictor.prepare,
                                                                              bytes(image))
            except (DecodeError, InputError) as err:
                return {"error": str(err), "status": error_status(err)}
        elif key != current.key:
            return {"stale": True, "key": current.key}  # prepared for another version: the ingress re-prepares
        else:
            crop, size = image
        result, batch_size = await self.predict_batch((current, crop, tuple(size)))
        out = {"model": self.name, "version": current.pin["version"], "alias": current.pin["alias"],
               **head.respond(result, size, parsed, current.predictor.meta), "batch_size": batch_size}
        return out

    async def _generate(self, current: LoadedModel, request: dict) -> dict:
        import secrets

        from vitray.tasks.generation.generator import GenerateError

        gen = current.predictor
        if not hasattr(gen, "generate"):
            return {"error": f"model {self.name} is a {current.predictor.task} model: it takes images", "status": 400}
        try:
            steps, guidance = gen.check(request.get("prompt"), request.get("steps"), request.get("guidance"))
        except GenerateError as err:
            return {"error": str(err), "status": 400}
        seed = request.get("seed")
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        png, batch_size = await self.generate_batch((current, request["prompt"], seed, steps, guidance))
        return {"png": png, "seed": seed, "steps": steps, "guidance": guidance, "model": self.name,
                "version": current.pin["version"], "alias": current.pin["alias"], "batch_size": batch_size}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def generate_batch(self, items: list[tuple]) -> list[tuple[bytes, int]]:
        """Prompts of concurrent requests sampled together (those with the same model version, steps and guidance);
        each image depends on its own prompt and seed only."""
        from vitray.tasks.generation.generator import png_bytes

        loop = asyncio.get_running_loop()
        results: list = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (loaded, _, _, steps, guidance) in enumerate(items):
            groups.setdefault((id(loaded), steps, guidance), []).append(i)
        for (_, steps, guidance), idx in groups.items():
            loaded = items[idx[0]][0]

            def run(idx=idx, loaded=loaded, steps=steps, guidance=guidance):
                images = loaded.predictor.generate([items[i][1] for i in idx], [items[i][2] for i in idx],
                                                   steps=steps, guidance=guidance)
                return [png_bytes(im) for im in images]

            pngs = await loop.run_in_executor(self._forward, run)
            for j, i in enumerate(idx):
                results[i] = (pngs[j], len(items))
        if self._batch_metric is not None:
            self._batch_metric.observe(len(items))
        return results

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, items: list[tuple[LoadedModel, np.ndarray, tuple]]) -> list[tuple[object, int]]:
        loop = asyncio.get_running_loop()
        results: list = [None] * len(items)
        groups: dict[int, list[int]] = {}
        for i, (loaded, _, _) in enumerate(items):  # items prepared for different versions (mid-reload) never mix
            groups.setdefault(id(loaded), []).append(i)
        for idx in groups.values():
            loaded = items[idx[0]][0]
            crops = np.stack([items[i][1] for i in idx])
            answers = await loop.run_in_executor(self._forward, loaded.predictor.predict_crops, crops,
                                                 [items[i][2] for i in idx])
            for j, i in enumerate(idx):
                results[i] = (answers[j], len(items))
        if self._batch_metric is not None:
            self._batch_metric.observe(len(items))
        return results


@serve.deployment
class ModelDeployment(ModelRunner):
    """One served model as its own deployment (called through a DeploymentHandle)."""
