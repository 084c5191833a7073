"""Rank-0 MLflow logging from inside a training worker: batched, off the training thread, never fatal.

Calls only queue work (a dict append); a background thread sends it with ``MlflowClient.log_batch`` (up to 1000
metrics, 100 params and 100 tags per request) every ``flush_interval_s`` and at the end. (Flushing at every epoch
end too cost 2.4% of training time on the 2-core reference machine with short epochs: benchmarks/tracking_overhead.py.) When the server
cannot be reached the items stay buffered (bounded), a warning is printed once, and sending is retried with
backoff; training never waits on the tracking server. ``close`` gives the last flush a deadline and says what
could not be sent (every metric is also in ``metrics.jsonl`` in run storage).
"""
from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

__all__ = ["RunLogger"]

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log_batch limits


class RunLogger:
    def __init__(self, tracking_uri: str, run_id: str, flush_interval_s: float = 10.0, max_buffered: int = 200_000,
                 request_timeout_s: float = 10.0):
        # make each HTTP attempt short and let the thread retry (restored by close())
        self._env = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(request_timeout_s))
        from .uris import client_for

        self.client = client_for(tracking_uri)
        self.uri, self.run_id = tracking_uri, run_id
        self.interval = flush_interval_s
        self._metrics: deque = deque()
        self._max_buffered = max_buffered
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._files: deque = deque()  # (local path, PIL image or function drawing one; artifact file)
        self._n_files = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._failing_since: float | None = None
        self._warned = False
        self.dropped = 0
        self.sent_requests = 0
        self.caller_seconds = 0.0  # time spent on the training thread (queueing, rendering pictures)
        self._tmp = tempfile.mkdtemp(prefix="vitray-mlflow-")
        self._thread = threading.Thread(target=self._loop, name="vitray-mlflow", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------- training thread
    def log_params(self, params: dict) -> None:
        with self._lock:
            self._params.update({str(k)[:250]: str(v)[:6000] for k, v in params.items()})

    def set_tags(self, tags: dict) -> None:
        with self._lock:
            self._tags.update({str(k)[:250]: str(v)[:5000] for k, v in tags.items() if v is not None})

    def log_metrics(self, metrics: dict, step: int) -> None:
        t0 = time.perf_counter()
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    if len(self._metrics) >= self._max_buffered:  # bounded while the server is away: newest dropped
                        self.dropped += 1
                    else:
                        self._metrics.append(Metric(k, float(v), ts, int(step)))
        self.caller_seconds += time.perf_counter() - t0

    def log_text(self, text: str, artifact_file: str) -> None:
        self._n_files += 1
        path = Path(self._tmp) / f"t{self._n_files}" / Path(artifact_file).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self._queue_file(path, artifact_file)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image, or a function returning one (drawn by the sender thread, off the training thread), saved as
        PNG under ``artifact_file`` (e.g. ``pictures/confusion_matrix.png``)."""
        self._queue_file(image, artifact_file)

    def _queue_file(self, item, artifact_file: str) -> None:
        with self._lock:
            self._files.append((item, artifact_file))

    def _materialize(self, item, artifact_file: str) -> tuple[str, str | None] | None:
        """(local path, artifact folder): draws a deferred picture and writes it to the logger's temp folder.
        None when drawing fails (warned; a picture is never worth stopping the metrics for)."""
        folder = str(Path(artifact_file).parent)
        if not isinstance(item, (str, Path)):
            try:
                image = item() if callable(item) else item
                self._n_files += 1
                path = Path(self._tmp) / f"i{self._n_files}" / Path(artifact_file).name
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path, format="PNG")
            except Exception as err:  # noqa: BLE001
                print(f"[vitray] warning: could not draw {artifact_file}: {type(err).__name__}: {err}", flush=True)
                return None
            item = path
        return str(item), None if folder in ("", ".") else folder

    def flush(self) -> None:
        """Ask the thread to send now (returns at once)."""
        self._wake.set()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Send what is left (within ``timeout_s``); True when nothing was left behind."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)
        for key, value in self._env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        left = self.pending()
        if left:
            print(f"[vitray] warning: {left} metric(s)/param(s)/file(s) could not be sent to MLflow at {self.uri} "
                  f"(run {self.run_id}); metrics.jsonl in run storage has every metric", flush=True)
        if self.dropped:
            print(f"[vitray] warning: {self.dropped} buffered metric(s) were dropped while MLflow was unreachable",
                  flush=True)
        if not self._thread.is_alive():
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
        return not left

    def pending(self) -> int:
        with self._lock:
            return len(self._metrics) + len(self._params) + len(self._tags) + len(self._files)

    # ---------------------------------------------------------------------------------- sender thread
    def _loop(self) -> None:
        try:
            self._run()
        except Exception as err:  # noqa: BLE001 - a dead sender must say so; training goes on regardless
            print(f"[vitray] warning: the MLflow logging thread stopped: {type(err).__name__}: {err}", flush=True)

    def _run(self) -> None:
        backoff = 1.0
        while True:
            self._wake.wait(self.interval if self._failing_since is None else backoff)
            self._wake.clear()
            stopping = self._stop
            ok = self._send_all()
            if ok:
                if self._failing_since is not None:
                    print(f"[vitray] MLflow at {self.uri} is back; buffered metrics sent", flush=True)
                self._failing_since, backoff = None, 1.0
            else:
                backoff = min(backoff * 2, 30.0)
            if stopping:  # one last try after close(): the end of a run cannot wait for a server to come back
                return

    def _send_all(self) -> bool:
        try:
            while True:
                with self._lock:
                    params = dict(list(self._params.items())[:MAX_PARAMS])
                    tags = dict(list(self._tags.items())[:MAX_TAGS])
                    metrics = [self._metrics[i] for i in range(min(MAX_METRICS, len(self._metrics)))]
                if not (params or tags or metrics):
                    break
                from mlflow.entities import Param, RunTag

                try:
                    self.client.log_batch(self.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                                          tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
                    self.sent_requests += 1
                except Exception as err:  # noqa: BLE001
                    if not _rejected(err):
                        raise
                    # the server refused the content (e.g. a param changed on resume): retrying it cannot help.
                    # Drop the params and tags of the request and send its metrics alone; metrics refused alone go.
                    print(f"[vitray] warning: MLflow refused a batch ({len(params)} param(s), {len(tags)} tag(s), "
                          f"{len(metrics)} metric(s)): {str(err).splitlines()[0][:300]}", flush=True)
                    with self._lock:
                        for k in params:
                            self._params.pop(k, None)
                        for k in tags:
                            self._tags.pop(k, None)
                        if not (params or tags):
                            for _ in metrics:
                                self._metrics.popleft()
                    continue
                with self._lock:
                    for _ in metrics:
                        self._metrics.popleft()
                    for k in params:
                        self._params.pop(k, None)
                    for k in tags:
                        self._tags.pop(k, None)
            while True:
                with self._lock:
                    if not self._files:
                        break
                    item, artifact_file = self._files[0]
                made = self._materialize(item, artifact_file)
                if made is not None:
                    path, folder = made
                    with self._lock:
                        self._files[0] = (path, artifact_file)  # drawn once, even if sending is retried
                    self.client.log_artifact(self.run_id, path, folder)
                    self.sent_requests += 1
                with self._lock:
                    self._files.popleft()
            return True
        except Exception as err:  # noqa: BLE001 - never let tracking kill training
            if self._failing_since is None:
                self._failing_since = time.time()
                if not self._warned:
                    self._warned = True
                    print(f"[vitray] warning: MLflow at {self.uri} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''}); training goes on, metrics are buffered "
                          "and retried", flush=True)
            return False


def _rejected(err: Exception) -> bool:
    """A 4xx answer about the request itself (not a lost connection or a server error)."""
    code = getattr(err, "error_code", "")
    return code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")
