"""Debian's ``chromium`` in headless mode, for the bench scripts that open the SDK's offline
pages (feature pages, the trace view) in a real browser."""

from __future__ import annotations

import shutil
import subprocess
import sys

#: every request that would leave the machine fails: the pages must need no network
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium found: apt-get install -y chromium")


def browse(args: list[str], timeout: float = 180) -> str:
    """Run headless chromium with ``args`` (e.g. ``--dump-dom URL``) and return its stdout;
    exit with chromium's error when it fails."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", "--allow-file-access-from-files",
            "--virtual-time-budget=5000", *OFFLINE]
    done = subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
