"""Issue 17 case 9: corpus reading streams. A generated 200 MB .txt file and a 20 MB
single-line document reach their first batch within seconds, and reading grows the peak RSS
by less than 300 MB (measured in a fresh subprocess from /proc/self/status). Before, the
200 MB file added 705 MB before the first batch and the 20 MB line was tokenised whole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
from llamascope_sdk import corpus
from tests.conftest import CharTokenizer
tok, path, rule = CharTokenizer(), sys.argv[1], sys.argv[2]
base = status("VmRSS")
t0 = time.perf_counter()
counts = corpus.ReadCounts()
b = next(corpus.batches(tok, path, tokens=4096, context=256, batch_size=8, rule=rule,
                        counts=counts))
out = {"first_s": time.perf_counter() - t0, "tokens": int(b.valid.sum()),
       "docs": counts.documents}
if sys.argv[3] == "all":
    out["all_docs"] = sum(1 for _ in corpus.iter_documents(path))
out["growth"] = status("VmHWM") - base
print(json.dumps(out))
"""


def measure(path: Path, rule: str, mode: str) -> dict[str, float]:
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), rule, mode], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc (Linux)")
def test_200mb_file_and_20mb_line_stream_in_bounded_memory(tmp_path: Path) -> None:
    para = " ".join(f"w{i % 97}" for i in range(100))  # about 390 characters
    block = ("\n\n".join([para] * 2000) + "\n\n").encode()
    big = tmp_path / "big.txt"
    with big.open("wb") as fh:
        for _ in range(200 * 2**20 // len(block) + 1):
            fh.write(block)
    line = tmp_path / "line.txt"
    line.write_text(((para + " ") * (20 * 2**20 // len(para) + 1))[:20 * 2**20] + "\n")
    try:
        got = measure(big, "first", "all")
        assert got["growth"] < 300 * 2**20 and got["first_s"] < 10, got
        assert got["tokens"] == 8 * 256 and got["all_docs"] == big.stat().st_size // len(block) * 2000
        for rule in ("first", "windows"):
            got = measure(line, rule, "first")
            assert got["growth"] < 300 * 2**20 and got["first_s"] < 10, (rule, got)
            assert got["docs"] == 1
            # first: one 256-id row; windows: 8 rows of 256 ids from the one document
            assert got["tokens"] == (256 if rule == "first" else 8 * 256)
    finally:
        big.unlink()
        line.unlink()
