"""Training progress on the driver's console: rank 0 posts events to a small actor, the driver polls it.

Ray forwards worker output to the driver, but as log lines (into the run's log file, see :mod:`vitray.console`);
the console shows one progress display drawn from these events instead: the step, loss, learning rate, images/s
and ETA as the run goes, each epoch's validation metrics as a milestone, and rank 0's own messages (resumed from,
exported to, data stalls). The actor takes no CPU, so it never competes with the trainers for a slot.
"""
from __future__ import annotations

import threading

from vitray.console import Progress, fmt_eta, log_only, progress, say

__all__ = ["DriverProgress", "WorkerProgress"]

POLL_S = 0.5


class _Inbox:
    def __init__(self):
        self.events: list = []

    def put(self, event) -> None:
        self.events.append(event)

    def take(self) -> list:
        out, self.events = self.events, []
        return out


class DriverProgress:
    """Owns the inbox actor and the ``train`` progress display for one ``run_training`` call."""

    def __init__(self, total_steps: int, epochs: int):
        import ray

        self.inbox = ray.remote(num_cpus=0)(_Inbox).remote()
        self.epochs = epochs
        self.bar: Progress = progress("train", total=total_steps, unit="steps")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="vitray-train-progress", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            if not self._take():
                return

    def _take(self) -> bool:
        import ray

        try:
            events = ray.get(self.inbox.take.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the display is a nicety: a lost actor ends it, never the run
            return False
        for kind, data in events:
            if kind == "say":
                say(data)
            elif kind == "step":
                log_only(f"[vitray] epoch {data['epoch'] + 1}/{data['epochs']} step {data['step']}/"
                         f"{self.bar.total} loss {data['loss']:.4f} lr {data['lr']:.2e} "
                         f"{data['images_per_s']:.0f} img/s eta {fmt_eta(data.get('eta_s'))}")
                self.bar.update(data["step"], eta_s=data.get("eta_s"), **{
                    "epoch": f"{data['epoch'] + 1}/{data['epochs']}", "loss": f"{data['loss']:.4f}",
                    "lr": f"{data['lr']:.2e}", "": f"{data['images_per_s']:.0f} img/s"})
            elif kind == "epoch":
                if data.get("primary"):
                    self.bar.update(None, **{data["primary"][0]: f"{data['primary'][1]:.4f}"})
                self.bar.milestone(data["text"], final=data["final"])
        return True

    def close(self) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=35)
        self._take()  # what came in after the last poll
        self.bar.close()
        try:
            ray.kill(self.inbox)
        except Exception:  # noqa: BLE001
            pass


class WorkerProgress:
    """Rank 0's side. Without an inbox (a loop run outside ``run_training``) messages are printed instead."""

    def __init__(self, inbox, enabled: bool):
        self.inbox, self.enabled = inbox, enabled

    def _post(self, kind: str, data) -> bool:
        if not self.enabled or self.inbox is None:
            return False
        try:
            self.inbox.put.remote((kind, data))
            return True
        except Exception:  # noqa: BLE001 - the driver may be gone; the run's own logs still have the line
            return False

    def say(self, text: str) -> None:
        if self.enabled and not self._post("say", text):
            print(text, flush=True)

    def step(self, epoch: int, epochs: int, step: int, loss: float, lr: float, images_per_s: float,
             eta_s: float) -> None:
        if self.enabled:
            self._post("step", {"epoch": epoch, "epochs": epochs, "step": step, "loss": loss, "lr": lr,
                                "images_per_s": images_per_s, "eta_s": eta_s})

    def epoch(self, text: str, final: bool, primary: tuple[str, float] | None = None) -> None:
        if self.enabled and not self._post("epoch", {"text": text, "final": final, "primary": primary}):
            print(text, flush=True)
