"""Run a command in a pseudo-terminal, as a person at a terminal would, and read back what the screen shows."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

from vitray.console import plain


def run_in_pty(args: list[str], env: dict | None = None, timeout: float = 600, cols: int = 120,
               cwd=None) -> tuple[int, bytes]:
    """``python -m vitray.cli ARGS`` with stdout and stderr on a pty; returns (exit code, every byte written)."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "vitray.cli", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True,
                            close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: every writer has closed the pty
                    chunk = b""
                if not chunk:
                    if proc.poll() is not None:
                        break
                    continue
                out.extend(chunk)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            raise TimeoutError(f"{args} ran past {timeout}s; output so far:\n{bytes(out[-3000:]).decode(errors='replace')}")
        return proc.wait(30), bytes(out)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


def screen_lines(raw: bytes) -> list[str]:
    """The lines a terminal is left showing: each line's last redraw (carriage return, erase-line), no escapes."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    lines = [plain(line) for line in text.split("\n")]
    while lines and not lines[-1].strip():  # the cursor's line, left empty when the last display was cleared
        lines.pop()
    return lines
