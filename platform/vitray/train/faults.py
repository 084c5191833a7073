"""Fault injection for tests of recovery: kill a training worker once at a chosen step, like a lost node.

Off unless ``VITRAY_TEST_KILL_AT_STEP`` and ``VITRAY_TEST_KILL_MARKER`` are set (the driver passes them to the
workers); the marker file makes it happen once, so the restarted attempt runs through.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

__all__ = ["step_hooks"]


def step_hooks(rank: int, world: int) -> list:
    """Functions the loop calls after each optimizer step with the global step."""
    kill_at = int(os.environ.get("VITRAY_TEST_KILL_AT_STEP", "0"))
    marker = os.environ.get("VITRAY_TEST_KILL_MARKER", "")
    if not kill_at or not marker or rank != world - 1:
        return []

    def kill(step: int) -> None:
        if step == kill_at and not os.path.exists(marker):
            # wait out Ray Train's 2 s health-check poll first, so the controller has registered the checkpoints
            # already reported (a real failure within that window resumes from the checkpoint before)
            time.sleep(5)
            Path(marker).write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)

    return [kill]
