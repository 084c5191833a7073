"""What a vitray command prints, and the complete log of everything else.

A command that runs Ray (``train``, ``score``, ``serve``, ``quickstart``, ``data pack``) runs inside
:func:`capture`: file descriptors 1 and 2 of the process go into pipes that one thread reads, so every byte the
process and its children write (vitray, Ray's driver logs, the worker lines Ray forwards to the driver, DeepSpeed,
MLflow, C++ components) passes through here. Each line goes to the run's log file (cursor control removed, one
timestamp per line). On the console, by default, only:

* vitray's own lines (:func:`say`, or a driver line that starts with ``[vitray]``, with its indented continuation);
* warnings and errors of the libraries (a ``WARNING``/``ERROR`` log record, a Python warning, a C++ ``W``/``E``
  line), each distinct message once, except the few in :data:`KNOWN_HARMLESS` (each has its reason there);
* one live progress display per stage (:class:`Progress`) when stdout is a terminal; when it is not (CI, ``ray job
  submit`` logs, KubeRay) plain lines, no cursor control, at most one progress line per ``VITRAY_PROGRESS_EVERY_S``
  seconds (default 30) besides the stage's milestones.

``--verbose`` or ``VITRAY_VERBOSE=1`` passes everything through to the console as it comes.
Outside :func:`capture` (vitray used as a library, the tests) :func:`say` is ``print`` and progress is plain lines.
"""
from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["capture", "say", "log_only", "last_log", "progress", "log_to", "local_log", "drain", "verbose", "current_log", "fmt_eta", "Progress",
           "KNOWN_HARMLESS", "is_warning", "plain"]

VERBOSE_ENV = "VITRAY_VERBOSE"
INTERVAL_ENV = "VITRAY_PROGRESS_EVERY_S"
LOGS_KEPT = 50  # newest command logs kept in $VITRAY_HOME/logs (those that never moved into a run's storage)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x1b\][^\x07]*\x07")
# a line Ray forwards from another process: "(RayTrainWorker pid=12, ip=10.0.0.1) text", "(raylet) text"
_FORWARDED = re.compile(r"^\((?:[^\n]*? )?pid=\d+(?:, ip=[^)\s]*)?\) ?|^\((?:raylet|gcs_server|autoscaler|monitor)"
                        r"(?:, ip=[^)\s]*)?\) ?")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")
_TIMESTAMP = re.compile(r"^\[?\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d[,.]?\d*\]?\s*")
_WARNING = re.compile(
    r"\b(WARNING|WARN|ERROR|CRITICAL|FATAL)\b"               # Python / DeepSpeed / MLflow log records
    r"|^\[\S+ \S+ [WEF] \d+ \d+\]"                           # Ray's C++ (glog) lines: W, E, F
    r"|^\S+:\d+: \w*Warning: "                               # warnings.warn
    r"|^\[vitray\] (warning|error)\b", re.IGNORECASE)

# Messages that look like warnings but that vitray has triaged as harmless for its runs; they stay in the log file.
KNOWN_HARMLESS: tuple[tuple[str, str], ...] = (
    ("does not have any available CPUs", "Ray Data's check right after Ray starts, before the node has reported "
     "its CPUs; vitray's resource plan (its `resources:` line) checks the real capacity first and fails fast"),
    ("Setting accelerator to CPU", "DeepSpeed on a CPU-only run: vitray asked for its CPU accelerator"),
    ("Progress bars disabled", "Ray Data's own bars, off on purpose: vitray shows one progress display per stage"),
    ("ExecutionOptions.exclude_resources` is deprecated", "raised inside Ray Train's own DataConfig, not by vitray"),
    ("Failed to query Ray Train Controller actor state", "Ray Train's placement-group cleaner polling at start-up"),
    ("has constructor arguments in the object store and max_restarts > 0",
     "Ray core's note on every restartable actor (Ray Train's and Ray Data's own actors)"),
    ("graceful_shutdown failed", "raylet at shutdown of a local Ray, after the work is done"),
    ("Token authentication is enabled", "local Ray's notice; the local cluster binds 127.0.0.1"),
    ("not be able to find the sqlite", "MLflow alembic note on a new sqlite store"),
    ("torch.distributed.reduce_op", "DeepSpeed's import of a torch alias"),
    ("UserWarning: Found no NVIDIA driver", "torch on a machine without a GPU"),
    ("Unable to register cuDNN factory", "TensorFlow/XLA probes at import, when installed"),
    ("TypedStorage is deprecated", "DeepSpeed's checkpoint code on recent torch"),
)

_state: dict = {"capture": None, "verbose": None}


def verbose() -> bool:
    """Library logs on the console too: ``--verbose`` (set through :func:`capture`) or ``VITRAY_VERBOSE=1``."""
    if _state["verbose"] is not None:
        return _state["verbose"]
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


def plain(text: str) -> str:
    """``text`` without ANSI escapes, the last carriage-return segment of each line kept (a redrawn bar's final
    state) and Ray's forwarding prefix left as it is."""
    text = _ANSI.sub("", text)
    if "\r" in text:
        segments = [s for s in text.split("\r") if s.strip()]
        text = segments[-1] if segments else ""
    return text.rstrip()


def is_warning(text: str) -> bool:
    """A library warning or error worth a console line (not one of :data:`KNOWN_HARMLESS`)."""
    body = _FORWARDED.sub("", text, count=1)
    if not _WARNING.search(body) and not _WARNING.search(_TIMESTAMP.sub("", body)):
        return False
    return not any(marker in body for marker, _ in KNOWN_HARMLESS)


def fmt_eta(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------------------------------ the capture
class _Capture:
    """fd 1 and 2 into pipes; one thread writes each line to the log files and decides what the console shows."""

    MARK = b"\x00vitray-drain-"

    def __init__(self, log_path: Path, verbose: bool):
        self.verbose = verbose
        self.lock = threading.RLock()
        self.files: list = []  # open log files (the spool first)
        self.spool_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.files.append(open(log_path, "a", encoding="utf-8"))
        self.moved = False  # the spool was copied into a run's storage (then deleted at the end)
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = {1: os.dup(1), 2: os.dup(2)}
        self.term = {1: os.fdopen(os.dup(self.saved[1]), "w", encoding="utf-8", errors="replace", buffering=1),
                     2: os.fdopen(os.dup(self.saved[2]), "w", encoding="utf-8", errors="replace", buffering=1)}
        self.tty = self.term[1].isatty()
        self.live: Progress | None = None  # the progress display drawn on the last console line (tty only)
        self.seen: set[str] = set()
        self.continuing = {1: False, 2: False}  # the previous line was shown: its indented continuation is too
        self.in_traceback = {1: False, 2: False}
        self.drained = threading.Condition(self.lock)
        self.marks_seen = 0
        self.marks_sent = 0
        self.reads: dict[int, int] = {}
        self.bufs: dict[int, bytearray] = {}
        for fd in (1, 2):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            self.reads[r] = fd
            self.bufs[r] = bytearray()
        self.stopped = False
        self.thread = threading.Thread(target=self._pump, name="vitray-console", daemon=True)
        self.thread.start()

    # -------------------------------------------------------------------------------------------- reading
    def _pump(self) -> None:
        sel = selectors.DefaultSelector()
        for r in self.reads:
            sel.register(r, selectors.EVENT_READ)
        open_fds = set(self.reads)
        while open_fds:
            for key, _ in sel.select():
                r = key.fd
                try:
                    chunk = os.read(r, 1 << 16)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(r)
                    open_fds.discard(r)
                    continue
                buf = self.bufs[r]
                buf.extend(chunk)
                if self.verbose and not self.stopped:  # as it comes, cursor control included
                    self._raw(self.reads[r], chunk)
                while True:
                    i = buf.find(b"\n")
                    if i < 0:
                        if len(buf) > 1 << 16:  # a very long line, or a bar redrawn without newlines
                            i = len(buf) - 1
                        else:
                            break
                    line = bytes(buf[:i + 1])
                    del buf[:i + 1]
                    self._line(self.reads[r], line)

    def _raw(self, fd: int, chunk: bytes) -> None:
        if chunk.startswith(self.MARK) or self.MARK in chunk:
            chunk = re.sub(re.escape(self.MARK) + rb"\d+\n", b"", chunk)
        with self.lock:
            self._clear_live()
            self.term[fd].write(chunk.decode("utf-8", errors="replace"))
            self.term[fd].flush()
            self._draw_live()

    def _line(self, fd: int, raw: bytes) -> None:
        if self.MARK in raw:  # a drain marker, alone or after a partial line (a bar drawn without a newline)
            i = raw.index(self.MARK)
            with self.lock:
                self.marks_seen = max(self.marks_seen, int(raw[i + len(self.MARK):].strip() or 0))
                self.drained.notify_all()
            raw = raw[:i]
            if not raw.strip():
                return
        text = plain(raw.decode("utf-8", errors="replace"))
        if not text.strip():
            self.continuing[fd] = False
            return
        with self.lock:
            self._log(text)
            if self.stopped or self.verbose:
                return
            forwarded = bool(_FORWARDED.match(text))
            body = _REPEATED.sub("", _FORWARDED.sub("", text, count=1))
            if text.startswith("Traceback (most recent call last)") or body.startswith("Traceback (most recent"):
                self.in_traceback[fd] = True  # the failure reaches the user as one line; the log has the rest
                return
            if self.in_traceback[fd]:
                if body[:1].isspace() or not re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", body):
                    return
                self.in_traceback[fd] = False
                return
            show = own = False
            if not forwarded and text.startswith("[vitray]"):
                show = own = True
            elif self.continuing[fd] and text[:1].isspace() and not forwarded:
                show = own = True
            elif is_warning(text):
                key = _TIMESTAMP.sub("", body)
                key = re.sub(r"\d+", "#", key)[:300]  # pids, times, counters: one line per distinct message
                show = key not in self.seen
                self.seen.add(key)
                text = body if forwarded else text
            self.continuing[fd] = own
            if show:
                self._emit(text, err=fd == 2)

    # -------------------------------------------------------------------------------------------- writing
    def _log(self, text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for f in self.files:
            try:
                f.write(f"{stamp} {text}\n")
                f.flush()
            except (OSError, ValueError):
                pass

    def _emit(self, text: str, err: bool = False) -> None:
        with self.lock:
            self._clear_live()
            out = self.term[2 if err else 1]
            out.write(text + "\n")
            out.flush()
            self._draw_live()

    def say(self, text: str, err: bool = False) -> None:
        with self.lock:
            for line in text.splitlines() or [""]:
                self._log(line)
            if not self.stopped:
                self._emit(text, err)

    def _clear_live(self) -> None:
        if self.live is not None and self.tty and not self.verbose:
            self.term[1].write("\r\x1b[2K")

    def _draw_live(self) -> None:
        if self.live is not None and self.tty and not self.verbose:
            width = shutil.get_terminal_size((100, 24)).columns
            try:
                width = os.get_terminal_size(self.saved[1]).columns
            except OSError:
                pass
            self.term[1].write(self.live.render(width=max(20, width - 1)))
            self.term[1].flush()

    def drain(self, timeout: float = 2.0) -> None:
        """Wait until every byte this process wrote so far has been read (a marker through the pipe)."""
        if self.stopped:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        with self.lock:
            self.marks_sent += 1
            n = self.marks_sent
        os.write(1, self.MARK + str(n).encode() + b"\n")
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.marks_seen < n and time.monotonic() < deadline:
                self.drained.wait(max(0.01, deadline - time.monotonic()))

    def add_file(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.drain()
        with self.lock:
            self.files[0].flush()
            spool = Path(self.spool_path).read_text(encoding="utf-8", errors="replace")
            f = open(path, "a", encoding="utf-8")
            f.write(spool)
            f.flush()
            self.files.append(f)
            self.moved = True
        return f

    def remove_file(self, f) -> None:
        self.drain()
        with self.lock:
            if f in self.files:
                self.files.remove(f)
            f.close()

    def stop(self, failed: BaseException | None) -> None:
        if failed is not None and not isinstance(failed, KeyboardInterrupt):
            import traceback

            for line in "".join(traceback.format_exception(failed)).splitlines():
                self._log(line)
        self.drain(timeout=1.0)
        with self.lock:
            if self.live is not None:
                self._clear_live()
                self.live = None
            self.stopped = True
            for f in self.term.values():
                f.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[1], 1)
        os.dup2(self.saved[2], 2)
        with self.lock:  # the reader may go on (a child process can hold the pipe): it writes nothing any more
            for f in self.files:
                f.close()
            self.files = []
        if self.moved and failed is None:
            with contextlib.suppress(OSError):
                Path(self.spool_path).unlink()
        for f in self.term.values():
            with contextlib.suppress(OSError):
                f.close()
        for fd in self.saved.values():
            with contextlib.suppress(OSError):
                os.close(fd)


def _spool_path(command: str) -> Path:
    from vitray.config import vitray_home

    folder = vitray_home() / "logs"
    with contextlib.suppress(OSError):
        old = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
        for p in old[: max(0, len(old) - LOGS_KEPT + 1)]:
            p.unlink()
    return folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextlib.contextmanager
def capture(command: str, verbose_flag: bool | None = None):
    """Run the body with the process's output captured (see the module docstring). Yields the spool log path:
    the command's complete log, kept in ``$VITRAY_HOME/logs`` unless a run's storage took it (:func:`log_to`)."""
    if _state["capture"] is not None:  # nested (quickstart calling train): one capture per process
        yield _state["capture"].spool_path
        return
    if verbose_flag:
        _state["verbose"] = True
    try:
        cap = _Capture(_spool_path(command), verbose())
    except OSError as err:  # no usable fd 1/2 (a daemon) or no writable home: run uncaptured rather than not at all
        print(f"[vitray] warning: output not captured ({err}); library logs stay on the console", file=sys.stderr)
        yield None
        return
    _state["capture"] = cap
    failed = None
    try:
        yield cap.spool_path
    except BaseException as err:
        failed = err
        raise
    finally:
        _state["capture"] = None
        cap.stop(failed)
        _state["last_log"] = cap.spool_path if cap.spool_path.exists() else None


def last_log() -> Path | None:
    """The log of the last capture that ended, when it was kept (a failed command's always is)."""
    return _state.get("last_log")


def current_log() -> Path | None:
    """The spool log of the capture in force, if any."""
    cap = _state["capture"]
    return cap.spool_path if cap is not None else None


_LOCAL_LOGS: dict[str, Path] = {}  # log_to's target -> the local file written meanwhile


def local_log(path) -> Path | None:
    """The local file behind a path given to :func:`log_to` (itself, or for an object store URI the local copy
    being written until the upload); None when there is none."""
    if path is None:
        return None
    local = _LOCAL_LOGS.get(str(path), Path(str(path)))
    return local if local.is_file() else None


@contextlib.contextmanager
def log_to(path: str | Path):
    """For the body, the captured output also goes to ``path`` (a run's storage), which starts with everything the
    command logged so far. Yields the path, or None outside a capture (nothing to write)."""
    cap = _state["capture"]
    if cap is None:
        yield None
        return
    from vitray import storage

    remote = storage.is_uri(path)
    local = Path(tempfile.mkdtemp(prefix="vitray-log-")) / storage.basename(path) if remote else Path(path)
    f = cap.add_file(local)
    _LOCAL_LOGS[str(path)] = local
    try:
        yield path if remote else local
    finally:
        cap.remove_file(f)
        _LOCAL_LOGS.pop(str(path), None)
        if remote:  # an object store has no append: the log is written locally, then uploaded whole
            try:
                storage.write_bytes(path, local.read_bytes())
            except OSError as err:
                print(f"[vitray] warning: could not upload the log to {path}: {err}", file=sys.stderr, flush=True)
            shutil.rmtree(local.parent, ignore_errors=True)


def drain() -> None:
    cap = _state["capture"]
    if cap is not None:
        cap.drain()


def log_only(text: str) -> None:
    """A line for the log file only (inside a capture; nothing otherwise)."""
    cap = _state["capture"]
    if cap is not None:
        with cap.lock:
            cap._log(text)


def say(text: str, err: bool = False) -> None:
    """A vitray line for the console (and the log)."""
    cap = _state["capture"]
    if cap is None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    else:
        cap.say(text, err)


# ----------------------------------------------------------------------------------------------- progress
class Progress:
    """One stage's progress: a live line redrawn in place on a terminal, or plain lines at most one per interval.

    ``update(done, **fields)`` records the position (and what to show beside it); ``milestone(text)`` prints a
    line that summarises a part of the stage (an epoch) unless one was printed less than the interval ago (the last
    one always prints with ``final=True``); ``close()`` ends the display.
    """

    def __init__(self, label: str, total: int | None = None, unit: str = "", interval_s: float | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.fields: dict[str, str] = {}
        self.t0 = time.monotonic()
        self.rate_from: tuple[float, int] | None = None  # (time, done) of the first update: rate excludes start-up
        self.interval = _interval() if interval_s is None else interval_s
        self.last_line = 0.0  # time of the last plain line printed for this stage
        self.eta_s: float | None = None
        self.last_draw = 0.0
        cap = _state["capture"]
        self.live = cap is not None and cap.tty and not cap.verbose
        if self.live:
            with cap.lock:
                cap.live = self
                cap._draw_live()

    def _eta(self) -> float | None:
        if self.eta_s is not None:
            return self.eta_s
        if not self.total or self.rate_from is None:
            return None
        t, d = self.rate_from
        if self.done <= d:
            return None
        rate = (self.done - d) / max(time.monotonic() - t, 1e-9)
        return (self.total - self.done) / rate

    def render(self, bar: bool = True, width: int | None = None) -> str:
        """One line; with ``width``, the last fields are left out until it fits (never a value cut in half)."""
        parts = [self.label]
        if self.total:
            frac = min(1.0, self.done / self.total)
            if bar:
                parts.append("[" + "#" * int(frac * 20) + "-" * (20 - int(frac * 20)) + "]")
            parts.append(f"{self.done:,}/{self.total:,}{' ' + self.unit if self.unit else ''} ({frac:.0%})")
        else:
            parts.append(f"{self.done:,}{' ' + self.unit if self.unit else ''}")
        if self.total:
            parts.append(f"eta {fmt_eta(self._eta())}")
        fixed = len(parts)
        parts += [f"{k} {v}" if k else v for k, v in self.fields.items()]
        sep = "  " if bar else " "
        while width and len(parts) > fixed and len(sep.join(parts)) > width:
            parts.pop()
        return sep.join(parts)[: width or None]

    def update(self, done: int | None = None, *, eta_s: float | None = None, **fields) -> None:
        """``fields``: shown as ``name value`` in the order given (an empty name shows the value alone)."""
        if done is not None:
            if self.rate_from is None:
                self.rate_from = (time.monotonic(), done)
            self.done = done
        if eta_s is not None:
            self.eta_s = eta_s
        self.fields.update({k: str(v) for k, v in fields.items()})
        cap = _state["capture"]
        now = time.monotonic()
        if self.live and cap is not None:
            if now - self.last_draw >= 0.2:  # redraws at most 5 times a second
                self.last_draw = now
                with cap.lock:
                    cap._clear_live()
                    cap._draw_live()
            return
        if done is not None and now - max(self.last_line, self.t0) >= self.interval:
            self.last_line = now
            say(f"[vitray] {self.render(bar=False)}")

    def milestone(self, text: str, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self.last_line >= self.interval:
            self.last_line = now
            say(text)
            return True
        log_only(text)  # every milestone is in the log
        return False

    def close(self) -> None:
        cap = _state["capture"]
        if self.live and cap is not None:
            with cap.lock:
                if cap.live is self:
                    cap._clear_live()
                    cap.term[1].flush()
                    cap.live = None
        self.live = False


def progress(label: str, total: int | None = None, unit: str = "", interval_s: float | None = None) -> Progress:
    return Progress(label, total, unit, interval_s)
