"""Open a demo attribution graph's offline view (graph.html) in a real headless browser and
check what it draws.

Runs ``llamascope trace --transcoders demo`` on SmolLM2-135M as a user would (offline, the
shipped demo transcoders), then Debian's ``chromium`` with the network disabled:
``--dump-dom`` (the page after its script ran) must hold one SVG circle per feature node and
one square per error, embedding and logit node of ``viewer.json``, one label per prompt token,
and no request may leave the file; ``--screenshot`` writes the PNG (default
bench/out/trace_graph.png; the README's docs/trace_demo.png is one such run).

    .venv/bin/python bench/trace_view_screenshot.py [--png PATH] [--max-nodes 300]
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench.headless

from bench.headless import browse  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Italy is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png", type=Path, default=REPO / "bench" / "out" / "trace_graph.png")
    ap.add_argument("--max-nodes", type=int, default=300)
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "graph"
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "llamascope_sdk", "trace", "--transcoders",
                               "demo", "--max-nodes", str(args.max_nodes), "--out", str(out),
                               "--prompt", args.prompt], cwd=REPO, capture_output=True,
                              text=True, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"llamascope trace failed ({done.returncode}): {done.stderr[-2000:]}")
        print(f"llamascope trace: {time.perf_counter() - t:.1f} s")
        print("\n".join(done.stdout.strip().splitlines()[:3]))

        viewer = json.loads((out / "viewer.json").read_text())
        kinds = Counter(n["feature_type"] for n in viewer["nodes"])
        want_circles = kinds["cross layer transcoder"]
        want_squares = sum(kinds.values()) - want_circles
        page = (out / "graph.html").as_uri()
        dom = browse(["--dump-dom", page])
        circles, squares = len(re.findall(r"<circle\b", dom)), len(re.findall(r"<rect\b", dom))
        lines = len(re.findall(r"<line\b", dom))
        drawn_links = len(viewer["links"])
        tokens = viewer["metadata"]["prompt_tokens"]
        print(f"viewer.json: {dict(kinds)}, {drawn_links} links, {len(tokens)} prompt tokens")
        print(f"DOM after the script ran: {circles} circles, {squares} squares, {lines} lines")
        ok = (circles == want_circles and squares == want_squares and lines == drawn_links)
        missing = [t for t in tokens if html.escape(t, quote=False) not in dom]
        ok = ok and not missing
        print("check: one shape per node, one line per link, every token labelled: "
              + ("PASS" if ok else f"FAIL (tokens not shown: {missing})"))

        args.png.parent.mkdir(parents=True, exist_ok=True)
        browse([f"--screenshot={args.png}", "--window-size=1600,1200", page])
        print(f"screenshot: {args.png} ({args.png.stat().st_size:,} bytes)")
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
