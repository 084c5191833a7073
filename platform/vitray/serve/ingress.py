"""The HTTP API: one FastAPI ingress in front of every model deployment.

Routes: one ``POST`` per task that can be served, at the route the task registry names (``/v1/classify``,
``/v1/segment``): the encoded image as the body with an image content type, or a multipart form with one file; the
``model`` query parameter picks the served model, the rest are the task's own (its inference head's ``Params``:
``top_k`` and ``probs`` for classify, ``format`` for segment). Then ``GET /v1/models``, ``GET /healthz``, and
FastAPI's ``/docs`` and ``/openapi.json``. Every error is a JSON ``{"error": "..."}`` with a 4xx status (400 bad image or
parameter, 401 missing or wrong token, 404 unknown model or route, 413 body or pixel count over the limit, 415 not
an image content type); the ingress never answers a client mistake with a 500 or a traceback.

A new task needs nothing here: its route and answers come from ``vitray.tasks``.
"""

import asyncio
import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from vitray import __version__

__all__ = ["Ingress", "api", "ApiError", "TokenSource", "IMAGE_TYPES", "routes"]

IMAGE_TYPES = ("image/", "application/octet-stream")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class ErrorResponse(BaseModel):
    error: str


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 411, 413, 415)}

api = FastAPI(title="vitray", version=__version__,
              description="Vision Transformers served by Ray Serve. Send an encoded image (JPEG, PNG, WebP, ...) as "
                          "the request body with its image content type, or as a multipart form file.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError):
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError):
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {e.get('msg')} (given {e.get('input')!r})" if where else str(e.get("msg")))
    return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    message = {404: f"no route {request.method} {request.url.path}; see /docs",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(err.status_code, str(err.detail))
    return JSONResponse({"error": message}, status_code=err.status_code, headers=getattr(err, "headers", None))


class TokenSource:
    """The bearer token, from an environment variable or a file (re-read when the file changes, as a mounted
    Kubernetes Secret does on rotation). No source configured: auth is off."""

    def __init__(self, env: str | None = None, file: str | None = None):
        self.env, self.file = env, file
        self._mtime: float | None = None
        self._token: str | None = None
        if self.enabled and not self.current():
            where = f"environment variable {env}" if env else f"file {file}"
            raise ValueError(f"serve auth: the token {where} is missing or empty")

    @property
    def enabled(self) -> bool:
        return bool(self.env or self.file)

    def current(self) -> str | None:
        if self.env:
            return os.environ.get(self.env, "").strip() or None
        if self.file:
            try:
                mtime = os.stat(self.file).st_mtime
                if mtime != self._mtime:
                    self._token, self._mtime = Path(self.file).read_text().strip() or None, mtime
            except OSError:
                pass  # keep the last token we read: a Secret being swapped is briefly absent
            return self._token
        return None

    def check(self, header: str | None) -> None:
        if not self.enabled:
            return
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                           {"WWW-Authenticate": "Bearer"})
        token = self.current()
        if token is None or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "invalid bearer token", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


async def read_image_body(request: Request, limit: int) -> bytes:
    """The image bytes of a request: the raw body (image/* or application/octet-stream) or the one file of a
    multipart form. Over ``limit`` bytes -> 413 (refused from Content-Length before reading when it is given)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {int(length):,} bytes is over the limit of {limit:,}")
    if ctype == "multipart/form-data":
        if not (length and length.isdigit()):  # the form parser spools parts to disk without a cap
            raise ApiError(411, "a multipart upload needs a Content-Length header (or send the image bytes as the body)")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as err:  # noqa: BLE001 - malformed multipart bodies raise several types
            raise ApiError(400, f"malformed multipart body: {str(err)[:200]}") from None
        files = [v for v in form.values() if hasattr(v, "read")]
        if len(files) != 1:
            raise ApiError(400, f"a multipart request needs exactly one file part (the image), got {len(files)}")
        if files[0].content_type and not files[0].content_type.lower().startswith(IMAGE_TYPES):
            raise ApiError(415, f"file part content type {files[0].content_type!r} is not an image type")
        data = await files[0].read()
    elif ctype.startswith(IMAGE_TYPES):
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over the limit of {limit:,} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
    else:
        raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}: send the image bytes with an image "
                            "content type (image/jpeg, image/png, ...) or as multipart/form-data")
    if len(data) > limit:
        raise ApiError(413, f"request body of {len(data):,} bytes is over the limit of {limit:,}")
    if not data:
        raise ApiError(400, "empty image: the request carried 0 bytes")
    return data


class _Remote:
    """A model deployment behind a DeploymentHandle."""

    def __init__(self, handle):
        self.handle = handle

    async def answer(self, *args):
        return await self.handle.answer.remote(*args)

    async def info(self) -> dict:
        return await self.handle.info.remote()


class _Local:
    """A model loaded in this replica (one model served: no hop to another replica)."""

    def __init__(self, model):
        self.model = model

    async def answer(self, *args):
        return await self.model.answer(*args)

    async def info(self) -> dict:
        return self.model.info()


def routes() -> dict[str, str]:
    """task -> its HTTP route, for every task that can be served (``vitray.tasks``)."""
    from vitray.tasks import TASKS

    return {name: info.route for name, info in TASKS.items() if info.has("infer") and info.route}


class _Routes:
    """The ingress's methods; one route method per servable task is added below, then Serve wraps the class."""

    def __init__(self, models: dict, tasks: dict[str, str | None], settings: dict, local: dict | None = None):
        """``models``: name -> DeploymentHandle of its deployment; ``local``: name -> ModelRunner init args for a
        model that runs in this replica instead (its ``user_config`` then comes through this deployment's);
        ``tasks``: name -> the configured task, None for "what its export says" (asked of the model)."""
        from vitray.serve.model import ModelRunner

        self.local = {name: ModelRunner(*init) for name, init in (local or {}).items()}
        self.models = {**{n: _Remote(h) for n, h in models.items()}, **{n: _Local(m) for n, m in self.local.items()}}
        self.tasks = dict(tasks)
        self.default: dict[str, str] = {}
        self.limit = int(settings.get("max_body_bytes", 20 * 1024 * 1024))
        self.max_pixels = settings.get("max_pixels")
        self.decode_here = settings.get("decode") == "ingress" and not self.local
        self.auth = TokenSource(settings.get("auth_token_env"), settings.get("auth_token_file"))
        self._decode = ThreadPoolExecutor(int(settings.get("decode_threads", 2)), thread_name_prefix="vitray-decode")
        self._prep: dict[str, dict] = {}  # model -> {"key", "meta"} for decoding here

    async def _task_of(self, name: str) -> str | None:
        if self.tasks.get(name) is None:
            info = await self.models[name].info()
            if info.get("ready"):
                self.tasks[name] = info["task"]
        return self.tasks.get(name)

    async def _model(self, name: str | None, task: str) -> str:
        """The served model a request names (default: the first model of the route's task); 404 otherwise."""
        if name is None:
            for n in self.models:
                if await self._task_of(n) == task:
                    name = n
                    break
        if name not in self.models or await self._task_of(name) != task:
            served = [n for n in self.models if await self._task_of(n) == task]
            raise ApiError(404, f"no {task} model {name!r}; served: {', '.join(served) or 'none'}")
        return name

    async def _prepared(self, name: str, data: bytes, refresh: bool = False):
        from vitray.predict import prepare

        if refresh or name not in self._prep:
            info = await self.models[name].info()
            self._prep[name] = {"key": info["key"], "meta": {"task": info["task"], "preprocessing": info["preprocessing"]}}
        entry = self._prep[name]
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decode, prepare, data, entry["meta"], self.max_pixels), entry["key"]

    async def _answer(self, task: str, request: Request) -> JSONResponse:
        self.auth.check(request.headers.get("authorization"))
        params = dict(request.query_params)
        name = await self._model(params.pop("model", None), task)
        data = await read_image_body(request, self.limit)
        result = await self._ask(self.models[name], name, data, params)
        if "error" in result:
            raise ApiError(result["status"], result["error"])
        batch = result.pop("batch_size", None)
        return JSONResponse(result, headers={"x-vitray-batch-size": str(batch), "x-vitray-model-version":
                                             str(result.get("version"))})

    async def _generate(self, task: str, request: Request) -> Response:
        """A prompt route: a JSON body validated by the head's ``Request`` model; the answer is the PNG itself."""
        import json

        from pydantic import ValidationError

        from vitray.predict import head_of
        from vitray.serve.model import params_error

        self.auth.check(request.headers.get("authorization"))
        params = dict(request.query_params)
        name = await self._model(params.pop("model", None), task)
        if params:
            raise ApiError(400, f"unknown query parameter(s): {', '.join(sorted(params))} (the request is the JSON "
                                "body)")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            raise ApiError(413, f"body of {int(declared):,} bytes; the limit is {self.limit:,}")
        body = await request.body()
        if len(body) > self.limit:
            raise ApiError(413, f"body of {len(body):,} bytes; the limit is {self.limit:,}")
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not JSON: send {\"prompt\": \"...\", \"seed\"?, \"steps\"?, "
                                "\"guidance\"?}") from None
        try:
            req = head_of({"task": task}).Request.model_validate(payload)
        except ValidationError as err:
            raise ApiError(400, params_error(err)) from None
        result = await self.models[name].answer(req.model_dump(), {})
        if "error" in result:
            raise ApiError(result["status"], result["error"])
        return Response(result["png"], media_type="image/png", headers={
            "x-vitray-seed": str(result["seed"]), "x-vitray-model-version": str(result.get("version")),
            "x-vitray-model": name, "x-vitray-batch-size": str(result.get("batch_size")),
            "x-vitray-steps": str(result["steps"]), "x-vitray-guidance": f"{result['guidance']:g}"})

    async def reconfigure(self, user_config: dict) -> None:
        """Models running in this replica: ``{"models": {name: that model's user_config}}``."""
        for name, cfg in (user_config.get("models") or {}).items():
            await self.local[name].reconfigure(cfg)

    async def versions(self) -> dict:
        """name -> the version this replica's path serves (``vitray serve reload`` waits on it)."""
        infos = await asyncio.gather(*(m.info() for m in self.models.values()))
        return {i["name"]: i.get("version") for i in infos}

    async def _ask(self, model, name: str, data: bytes, params: dict) -> dict:
        if not self.decode_here:
            return await model.answer(data, params)
        from vitray.data.decode import DecodeError
        from vitray.predict import InputError
        from vitray.serve.model import error_status

        for refresh in (False, True):
            try:
                prepared, key = await self._prepared(name, data, refresh)
            except (DecodeError, InputError) as err:
                return {"error": str(err)[:300], "status": error_status(err)}
            result = await model.answer(prepared, params, key)
            if not result.get("stale"):
                return result
        return {"error": "the model was reloaded twice during this request; retry", "status": 503}

    @api.get("/v1/models", summary="Served models: name, task, route, version, alias, classes, input size")
    async def list_models(self, request: Request):
        self.auth.check(request.headers.get("authorization"))
        infos = await asyncio.gather(*(m.info() for m in self.models.values()))
        for info in infos:
            info.pop("key", None)
            info.pop("preprocessing", None)
            info["route"] = routes().get(info.get("task") or self.tasks.get(info["name"]))
        return {"models": infos}

    @api.get("/healthz", summary="Liveness of the HTTP ingress (no auth)")
    async def healthz(self):
        return {"status": "ok", "models": list(self.models)}


def _task_head(task: str):
    from vitray.predict import head_of

    return head_of({"task": task})


def _route_method(task: str, route: str):
    """``POST route``: one image in, the task's answer out; parameters and response documented from its head."""
    from vitray.predict import head_of

    head = head_of({"task": task})
    params = [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
               "description": "served model name (default: the first model of this task)"}]
    for pname, schema in head.Params.model_json_schema().get("properties", {}).items():
        params.append({"name": pname, "in": "query", "required": False,
                       "schema": {k: v for k, v in schema.items() if k != "description"},
                       "description": schema.get("description", "")})

    async def method(self, request: Request):
        return await self._answer(task, request)

    method.__name__ = f"post_{task}"
    method.__qualname__ = f"{_Routes.__qualname__}.post_{task}"  # how Serve finds the class's routes
    return api.post(route, response_model=head.Response, response_model_exclude_none=True, responses=_ERRORS,
                    summary=head.summary, openapi_extra={"parameters": params, "requestBody": {
                        "required": True, "content": {
                            "image/*": {"schema": {"type": "string", "format": "binary"}},
                            "multipart/form-data": {"schema": {"type": "object", "properties": {
                                "file": {"type": "string", "format": "binary"}}}}}}})(method)


def _prompt_route_method(task: str, route: str):
    """``POST route``: a JSON prompt in, an image out (a task whose head takes prompts)."""
    from vitray.predict import head_of

    head = head_of({"task": task})

    async def method(self, request: Request):
        return await self._generate(task, request)

    method.__name__ = f"post_{task}"
    method.__qualname__ = f"{_Routes.__qualname__}.post_{task}"
    return api.post(route, response_class=Response, responses={**_ERRORS, 200: {
        "content": {"image/png": {}}, "description": "the image; x-vitray-seed, x-vitray-model-version headers"}},
        summary=head.summary, openapi_extra={
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "served model name (default: the first model of this task)"}],
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": head.Request.model_json_schema()}}}})(method)


for _task, _route in routes().items():
    _make = _prompt_route_method if getattr(_task_head(_task), "inputs", "image") == "prompt" else _route_method
    setattr(_Routes, f"post_{_task}", _make(_task, _route))

Ingress = serve.deployment(serve.ingress(api)(_Routes))
