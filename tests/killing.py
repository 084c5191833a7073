"""Killing a real `vitray score` job midway, for the exactly-once tests (tests/test_score.py, tests/test_object_storage.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable


def run_and_kill_midway(cmd: list[str], env: dict, log_path: Path, parts: Callable[[], list], total: int,
                        timeout: float = 300) -> list:
    """Start ``cmd`` (a process group of its own: the driver and the Ray it starts) and SIGKILL the group as soon as
    ``parts()`` lists a written unit. The driver receives predictions in bursts, so a kill can land after the last
    unit is written, which leaves nothing to test: then the job starts again, fresh (``--overwrite``), at most 3
    times. Returns ``parts()`` after the kill."""
    done: list = []
    for attempt in range(3):
        log = open(log_path, "wb")  # a file, not a pipe nobody reads while the job runs
        proc = subprocess.Popen(cmd + (["--overwrite"] if attempt else []), stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            deadline = time.time() + timeout
            while proc.poll() is None and time.time() < deadline and not parts():
                time.sleep(0.05)
            assert proc.poll() is None, "the job ended before it could be killed: " + log_path.read_text()[-3000:]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        done = parts()
        if len(done) < total:
            break
    return done
