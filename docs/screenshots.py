"""The report's screenshots in the README and the docs, rendered from a real run by a headless browser.

    python docs/screenshots.py RUN_DIR      # e.g. runs/demo, after `sae-lens-ctx run --out runs/demo`

writes `docs/images/report-first-screen.png`: the report's first screen (`RUN_DIR/report/index.html`) at
1400 × 900 in Debian's chromium, as the report tests drive it (tests/support/browser.py). Regenerate it
after a change to the report's first screen, so that the image shows what the code draws.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

IMAGES = Path(__file__).resolve().parent / "images"
SHOTS = {"report-first-screen.png": ("", (1400, 900))}
"""Image file → (the report's page anchor, '' for its first screen; the window size)."""


def main(run_dir: str) -> None:
    index = Path(run_dir).resolve() / "report" / "index.html"
    if not index.is_file():
        raise SystemExit(f"{index} does not exist: run `sae-lens-ctx run --out {run_dir}` first")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    IMAGES.mkdir(exist_ok=True)
    for name, (anchor, (width, height)) in SHOTS.items():
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--window-size={width},{height}",
                            f"--screenshot={IMAGES / name}", index.as_uri() + anchor],
                           check=True, capture_output=True, timeout=600)
        print(IMAGES / name)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
