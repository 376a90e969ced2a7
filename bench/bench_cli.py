"""CLI latency: `llamascope --help` (target <= 1.5 s) and the offline demo end to end with warm
caches (target <= 30 s on a 2-core CPU). Medians over several runs; prints a table."""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def _time(cmd: list[str], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--demo-runs", type=int, default=3)
    args = ap.parse_args()
    exe = shutil.which("llamascope")
    base = [exe] if exe else [sys.executable, "-m", "llamascope_sdk"]
    rows = []
    med, ts = _time([*base, "--help"], args.runs)
    rows.append(("llamascope --help", med, 1.5, ts))
    # warm the caches (converted SmolLM2 copy) once, then time
    subprocess.run([*base, "steer", "--sae", "demo"], check=True, capture_output=True)
    med, ts = _time([*base, "steer", "--sae", "demo"], args.demo_runs)
    rows.append(("llamascope steer --sae demo (warm)", med, 30.0, ts))
    print(f"{'command':40s} {'median s':>9s} {'target s':>9s} {'ratio':>6s}  result  runs")
    for name, m, target, ts in rows:
        print(f"{name:40s} {m:9.2f} {target:9.1f} {m / target:6.2f}  {'PASS' if m <= target else 'FAIL'}"
              f"    {', '.join(f'{t:.2f}' for t in ts)}")


if __name__ == "__main__":
    main()
