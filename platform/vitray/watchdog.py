"""A stall watchdog for the loops that wait on Ray Data: training (each worker's train and eval batches) and scoring
(the driver's prediction batches).

:func:`watched` moves the iteration to a feeder thread and hands its items over through a small queue (which also
prefetches one or two batches while the caller computes); only the time the caller spends *waiting* for the next
item counts. When nothing arrives for ``stall_s`` seconds it raises :class:`DataStallError` with Ray's view of the
cluster (free CPUs and GPUs, pending resource demands) and, when given, the pipeline's own state: a stalled run
fails loudly with the reason instead of waiting forever.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

__all__ = ["DataStallError", "watched"]

T = TypeVar("T")
_END = object()


class DataStallError(RuntimeError):
    """No batch arrived for the configured time. The message says what Ray was waiting for (kept short: Ray Train
    shows only part of a worker's error); ``details`` adds the pipeline's state for the log line."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class _Failed:
    def __init__(self, err: BaseException):
        self.err = err


def watched(items: Iterable[T], stall_s: float | None, *, what: str = "batch",
            pipeline_state: Callable[[], str] | None = None, fields: str = "") -> Iterator[T]:
    """Yield ``items``; raise :class:`DataStallError` when the next one takes more than ``stall_s`` seconds to come.
    ``stall_s`` None or 0: no watchdog (the items are yielded directly)."""
    if not stall_s:
        yield from items
        return
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def feed():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the caller, raised there
            q.put(_Failed(err))

    feeder = threading.Thread(target=feed, name="vitray-data-feeder", daemon=True)
    feeder.start()
    n = 0
    try:
        while True:
            t0 = time.monotonic()
            try:
                item = q.get(timeout=stall_s)
            except queue.Empty:
                raise DataStallError(_message(what, n, time.monotonic() - t0, fields),
                                     _pipeline(pipeline_state)) from None
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.err
            n += 1
            yield item
    finally:
        stop.set()


def _message(what: str, n: int, waited: float, fields: str) -> str:
    from vitray.capacity import cluster_diagnosis

    plural = what + ("es" if what.endswith("h") else "s") if n != 1 else what
    where = f"after {n} {plural}" if n else f"before the first {what}"
    text = f"data stall: no {what} arrived for {round(waited, 1):g} s ({where}). Ray: {cluster_diagnosis()}"
    return text + (f". If the data tasks have no CPU, change {fields}; if they are just slow, raise the "
                   "stall timeout" if fields else "")


def _pipeline(pipeline_state) -> str:
    if pipeline_state is None:
        return ""
    try:
        state = " | ".join(line.strip() for line in pipeline_state().splitlines()[:6] if line.strip())
    except Exception:  # noqa: BLE001 - the diagnosis is best effort
        return ""
    return f"pipeline: {state[:400]}" if state else ""
