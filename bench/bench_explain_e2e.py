"""End to end as a new user: `llamascope serve` (SmolLM2-135M-Instruct) as explainer and scorer,
`llamascope inspect` on the shipped corpus excerpts, then `llamascope explain` on N demo features.

Prints the wall time of each step, the estimate against the usage the server reported, and a few
explanations with their scores. Everything runs through the real CLI in subprocesses; the
server is stopped at the end (SIGTERM, then SIGKILL after 30 s).

    python bench/bench_explain_e2e.py --features 20 --out /tmp/explain-e2e
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "corpus"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llamascope_sdk", *args]


def start_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    fh = open(log, "wb")  # noqa: SIM115  (the server writes to it until stopped)
    proc = subprocess.Popen(cli("serve", "--model", "smollm2-135m", "--port", "0"),
                            stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.time() + 600
    while time.time() < deadline:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1) + "/v1"
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        time.sleep(1)
    raise SystemExit("the server did not start within 600 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("/tmp/explain-e2e"))
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--n-explain", type=int, default=10)
    ap.add_argument("--n-score", type=int, default=10)
    ap.add_argument("--scorer-batch", type=int, default=1,
                    help="contexts per scorer request (1: a yes/no question each, which a 135M "
                         "model can answer; 5: the list format)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="a CPU server shared with other work can take many minutes per request")
    ap.add_argument("--reuse-store", action="store_true", help="skip inspect if OUT/feats exists")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    store = a.out / "feats"
    t0 = time.time()
    proc, url = start_server(a.out / "serve.log")
    t_serve = time.time() - t0
    try:
        t1 = time.time()
        data = ",".join(str(CORPUS / f) for f in ("wikitext2-valid.txt", "tinyshakespeare.txt"))
        if not (a.reuse_store and (store / "manifest.json").is_file()):
            subprocess.run(cli("inspect", "--sae", "demo", "--dataset", data, "--tokens",
                               str(a.tokens), "--out", str(store), "--max-pages", "100"),
                           cwd=REPO, check=True)
        t_inspect = time.time() - t1
        t2 = time.time()
        r = subprocess.run(cli("explain", str(store), "--top-frequency", str(a.features),
                               "--endpoint", url, "--model", "smollm2-135m", "--n-explain",
                               str(a.n_explain), "--n-score", str(a.n_score), "--scorer-batch",
                               str(a.scorer_batch), "--concurrency",
                               str(a.concurrency), "--timeout", str(a.timeout),
                               "--tokenizer", "smollm2-135m", "--json"),
                           cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
        t_explain = time.time() - t2
    finally:
        stop(proc)
    summary = json.loads(r.stdout)
    est, used = summary["estimate"], summary["usage"]
    reported = used["prompt_tokens"] + used["completion_tokens"]
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"serve start {t_serve:.0f} s, inspect {t_inspect:.0f} s, explain {t_explain:.0f} s, "
          f"total {time.time() - t0:.0f} s")
    print(f"requests {used['requests']} (retries {used['retries']}), estimated "
          f"{est['requests']}; tokens reported {reported:,}, estimated {est['total_tokens']:,} "
          f"(ratio {est['total_tokens'] / max(1, reported):.3f}); unparsable: "
          f"{summary['unparsable_explanations']} explanations, "
          f"{summary['unparsable_scorer_batches']} scorer batches")
    for path in sorted(Path(summary["folder"], "features").glob("*.json"),
                       key=lambda p: int(p.stem)):
        rec = json.loads(path.read_text())
        scores = {k: v["balanced_accuracy"] for k, v in (rec["scores"] or {}).items()}
        print(f"feature {rec['feature']}: {rec['explanation']!r} {scores}")


if __name__ == "__main__":
    main()
