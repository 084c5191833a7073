"""Regenerate the README's console excerpt and MLflow pictures from a real run.

    python docs/console_and_ui.py [--home DIR] [--reuse]

1. Runs `vitray quickstart` with VITRAY_HOME=DIR in a pseudo-terminal (as a person at a terminal sees it) and writes the
   screen it leaves to docs/quickstart-console.txt (with --reuse, an existing DIR's run is used as it is and only
   the pictures are taken), and two frames of the live train and score lines to docs/quickstart-live-lines.txt;
   both go into README.md between its `console:begin` / `console:end` markers.
2. Starts `vitray ui` on that home (the real command), then takes screenshots with headless Chromium (Debian's
   `chromium` package: `apt-get install chromium`; driven by Playwright, `pip install -e '.[docs]'`, which uses
   that browser and downloads none) of the latest training run's metric charts and of its confusion matrix
   artifact: docs/images/mlflow-run-metrics.png and docs/images/mlflow-run-confusion-matrix.png.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from console_tools import run_in_pty, screen_lines  # noqa: E402


def live_frames(raw: bytes, label: str) -> list[str]:
    """The redraws of a stage's live display, in order (what the terminal's last line showed, frame by frame)."""
    from vitray.console import plain

    frames = [plain(seg.decode("utf-8", errors="replace")) for seg in raw.split(b"\r")]
    return [f for f in frames if f.startswith(f"{label}  [")]


def quickstart(home: Path) -> tuple[list[str], bytes]:
    t0 = time.time()
    # the default home, as a first run sees it, pointed at ``home`` (VITRAY_HOME): paths print as under ~/.vitray
    rc, raw = run_in_pty(["quickstart"], env={"VITRAY_HOME": str(home), "MLFLOW_TRACKING_URI": ""}, timeout=1800)
    lines = screen_lines(raw)
    if rc != 0:
        sys.exit("quickstart failed:\n" + "\n".join(lines[-30:]))
    print(f"quickstart: {len(lines)} lines on the terminal in {time.time() - t0:.0f}s")
    return lines, raw


def start_ui(home: Path) -> tuple[subprocess.Popen, str, str]:
    proc = subprocess.Popen([sys.executable, "-m", "vitray.cli", "ui", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "VITRAY_HOME": str(home), "MLFLOW_TRACKING_URI": ""})
    seen = []
    while True:
        line = proc.stdout.readline()
        seen.append(line)
        if not line or "Ctrl-C" in line:
            break
    found = re.search(r"latest training run .*?: (http://127\.0\.0\.1:\d+)/#(/experiments/\d+/runs/\w+)", "".join(seen))
    if not found:
        proc.send_signal(signal.SIGINT)
        sys.exit("vitray ui printed no training run:\n" + "".join(seen))
    return proc, found.group(1), found.group(2)


def screenshot(url: str, out: Path, ready: str, width: int = 1440, height: int = 1000) -> None:
    """``url`` in headless Chromium (Playwright driving the system's browser: nothing is downloaded), once the
    JavaScript condition ``ready`` holds (the charts drawn, the picture loaded)."""
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not browser_path:
        sys.exit("no headless browser: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_function(ready, timeout=90_000)
        page.wait_for_timeout(2000)  # the last animation frames
        page.screenshot(path=str(out))
        browser.close()
    print(f"{out.relative_to(ROOT)} <- {url}")


def update_readme() -> None:
    """The README block between the console markers: the screen and the live frames just written."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- console:begin -->\n", "<!-- console:end -->"
    screen = (ROOT / "docs" / "quickstart-console.txt").read_text()
    frames = (ROOT / "docs" / "quickstart-live-lines.txt").read_text()
    block = f"```\n{screen}```\n\nLive lines (train, score):\n\n```\n{frames}```\n"
    i, j = text.index(begin) + len(begin), text.index(end)
    readme.write_text(text[:i] + block + text[j:])
    print("README.md console block updated")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", default=None, help="quickstart home (default: a new temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="use the run already in --home; pictures only")
    args = ap.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="vitray-docs-")).resolve()
    if not args.reuse:
        lines, raw = quickstart(home)
        text = "\n".join(line.replace(str(home), "~/.vitray") for line in lines).strip("\n") + "\n"
        (ROOT / "docs" / "quickstart-console.txt").write_text(text)
        train, score = live_frames(raw, "train"), live_frames(raw, "score")
        picked = [train[len(train) // 3]] if train else []
        picked += [score[len(score) // 2]] if score else []
        (ROOT / "docs" / "quickstart-live-lines.txt").write_text("\n".join(picked) + "\n")
        print("docs/quickstart-console.txt and docs/quickstart-live-lines.txt written")
        update_readme()
    proc, base, page = start_ui(home)
    try:
        images = ROOT / "docs" / "images"
        images.mkdir(parents=True, exist_ok=True)
        screenshot(f"{base}/#{page}/model-metrics", images / "mlflow-run-metrics.png",
                   "() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 8",
                   width=1800, height=1560)
        screenshot(f"{base}/#{page}/artifacts/pictures/confusion_matrix.png",
                   images / "mlflow-run-confusion-matrix.png",
                   "() => [...document.images].some(i => i.complete && i.naturalWidth > 300)")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
