"""Corpus reading in bounded memory: a generated 200 MB .txt file and a 20 MB single-line
document, read into the first batch (and the 200 MB file through to its last document).

Each case runs in a fresh subprocess, which reports its peak RSS growth over its RSS after
the imports (``VmHWM - VmRSS`` from /proc/self/status, Linux) and the seconds to the first
batch. The same calls exist before and after the streaming reader, so pointing PYTHONPATH at
an older checkout measures it too.

    .venv/bin/python bench/bench_corpus_memory.py [--tokenizer char|smollm2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
path, which, mode = sys.argv[1], sys.argv[2], sys.argv[3]
from llamascope_sdk import corpus
if which == "char":
    from tests.conftest import CharTokenizer
    tok = CharTokenizer()
else:
    from transformers import AutoTokenizer
    from llamascope_sdk.loading.models import resolve_model_path
    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
base = status("VmRSS")
t0 = time.perf_counter()
ids, valid = next(corpus.token_batches(tok, corpus.iter_documents(path), tokens=2048,
                                       context=256, batch_size=8))
first = time.perf_counter() - t0
out = {"first_batch_s": round(first, 2), "first_batch_tokens": int(valid.sum())}
if mode == "all":
    t0 = time.perf_counter()
    out["documents"] = sum(1 for _ in corpus.iter_documents(path))
    out["all_documents_s"] = round(time.perf_counter() - t0, 2)
out["peak_growth_mb"] = round((status("VmHWM") - base) / 2**20, 1)
print(json.dumps(out))
"""


def make_files(folder: Path) -> tuple[Path, Path]:
    """A 200 MB paragraph file (about 420k paragraphs) and a 20 MB single line of words."""
    words = ("the of and to in a is that for it as was with be by on not he I this are or his "  # noqa: SIM905
             "from at which but have an they you were her she there one all we their").split()
    para = " ".join(words[(i * 7) % len(words)] for i in range(80))
    block = ("\n\n".join([para] * 2000) + "\n\n").encode()
    big = folder / "big.txt"
    with big.open("wb") as fh:
        for _ in range(200 * 2**20 // len(block) + 1):
            fh.write(block)
    line = folder / "line.txt"
    text = (para + " ") * (20 * 2**20 // (len(para) + 1) + 1)
    line.write_text(text[:20 * 2**20] + "\n")
    return big, line


def run(path: Path, which: str, mode: str) -> dict[str, float]:
    code = os.environ.get("PYTHONPATH", str(REPO)).split(os.pathsep)[0]
    env = {**os.environ, "PYTHONPATH": code}
    res = subprocess.run([sys.executable, "-c", CHILD, str(path), which, mode], env=env,
                         cwd=code, capture_output=True, text=True, timeout=1200, check=False)
    if res.returncode != 0:
        raise SystemExit(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", choices=["char", "smollm2"], default="char")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the two files")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        big, line = make_files(Path(tmp))
        print(f"code: {os.environ.get('PYTHONPATH', REPO)}; tokenizer: {args.tokenizer}")
        print(f"200 MB .txt, first batch then every document: {run(big, args.tokenizer, 'all')}")
        print(f"20 MB single line, first batch: {run(line, args.tokenizer, 'first')}")


if __name__ == "__main__":
    main()
