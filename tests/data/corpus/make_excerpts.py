"""Write the two corpus excerpts of this folder from the full files (see README.md here).

    python tests/data/corpus/make_excerpts.py SRC_DIR

SRC_DIR holds the full ``wikitext2-valid.txt`` and ``tinyshakespeare.txt``. The output is
deterministic: running it again on the same files rewrites the same bytes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: WikiText articles kept (each cut to its heading and lead section).
ARTICLES = 12
#: Tiny Shakespeare lines kept (ends on a blank line, between two speeches).
LINES = 596
_HEADING = re.compile(r"^ ?= [^=].* = ?$")
_SUBHEADING = re.compile(r"^ ?= = ")


def wikitext_leads(text: str, articles: int) -> str:
    """The first ``articles`` articles, each its `` = Title = `` line and the lines before its
    first sub-heading, in the file's own layout (blank lines and spacing kept)."""
    out: list[str] = []
    kept, in_lead = 0, False
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")):
            if kept == articles:
                break
            kept, in_lead = kept + 1, True
        elif _SUBHEADING.match(line):
            in_lead = False
        if in_lead or kept == 0:
            out.append(line)
    return "".join(out)


def first_lines(text: str, n: int) -> str:
    return "".join(text.splitlines(keepends=True)[:n])


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/data/corpus/make_excerpts.py SRC_DIR")
    src = Path(sys.argv[1])
    wiki = (src / "wikitext2-valid.txt").read_text(encoding="utf-8")
    play = (src / "tinyshakespeare.txt").read_text(encoding="utf-8")
    (HERE / "wikitext2-valid.txt").write_text(wikitext_leads(wiki, ARTICLES), encoding="utf-8")
    (HERE / "tinyshakespeare.txt").write_text(first_lines(play, LINES), encoding="utf-8")


if __name__ == "__main__":
    main()
