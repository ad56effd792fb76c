"""Open an HTML page in headless Chromium and read the report's self-check (JavaScript errors, empty figures).

The report embeds a script that, after load, writes ``{"figures", "empty", "errors", "plotly"}`` as JSON into
``<pre id="report-check">``; :func:`check_page` loads the page with ``--dump-dom`` (virtual time lets plotly draw)
and parses that element. Debian packages: ``chromium`` (and ``chromium-driver``), installed by ``setup.sh``/``.ci/run``.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def check_page(path: str | Path, *, timeout: float = 120.0) -> dict:
    """The self-check JSON of ``path`` as rendered by headless Chromium."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium chromium-driver)")
    url = Path(path).resolve().as_uri()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=15000", "--dump-dom", url]  # fmt: skip
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
    m = re.search(r'<pre id="report-check">(.*?)</pre>', dom, re.S)
    if m is None:
        raise RuntimeError(f"{path}: no report-check element in the rendered page")
    text = html.unescape(m.group(1)).strip()
    if text == "pending":
        raise RuntimeError(f"{path}: the page's check did not run (load event never fired?)")
    return json.loads(text)
