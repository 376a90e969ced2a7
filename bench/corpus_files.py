"""The full text corpus that the benches and ``training/build_demo.py`` read.

It is a folder, given with ``--corpus DIR`` (default ``$LLAMASCOPE_CORPUS``), holding the files
of :data:`SOURCES` under those names. The repository does not ship them (1.1 MB each); the tests
use the small excerpts in ``tests/data/corpus`` instead (same names; sources and licences in
its README).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

#: File name in the corpus folder -> where to download it.
SOURCES = {
    "wikitext2-valid.txt": "https://raw.githubusercontent.com/pytorch/examples/main/"
                           "word_language_model/data/wikitext-2/valid.txt",
    "tinyshakespeare.txt": "https://raw.githubusercontent.com/karpathy/char-rnn/master/"
                           "data/tinyshakespeare/input.txt",
}


def add_corpus_argument(parser: argparse.ArgumentParser) -> None:
    """``--corpus DIR``, defaulting to ``$LLAMASCOPE_CORPUS``."""
    parser.add_argument("--corpus", metavar="DIR", default=os.environ.get("LLAMASCOPE_CORPUS"),
                        help="folder holding " + " and ".join(SOURCES)
                             + " (default: $LLAMASCOPE_CORPUS)")


def corpus_files(folder: str | os.PathLike[str] | None, *names: str) -> list[Path]:
    """The files ``names`` inside ``folder``; exits with one line saying what is missing and
    where to download it when the folder is not given or lacks one of them."""
    where = "; ".join(f"download {n} from {SOURCES[n]}" for n in names if n in SOURCES)
    if not folder:
        sys.exit(f"error: no corpus folder: pass --corpus DIR (or set LLAMASCOPE_CORPUS) for a "
                 f"folder holding {' and '.join(names)}; {where}")
    files = [Path(folder).expanduser() / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"error: corpus file(s) not found: {', '.join(missing)}; {where}")
    return files
