"""Plain-text files, read incrementally with the .txt rule (see :mod:`llamascope_sdk.corpus`):
WikiText articles at `` = Title = `` headings (decided from the first MiB), else paragraphs at
blank lines, each document a lazy iterable of pieces."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from llamascope_sdk.base.errors import DataFormatError

#: A top-level WikiText heading: " = Title = " (sub-headings use " = = ... = = ").
_HEADING = re.compile(r"^ ?= [^=].* = ?$")
#: How much of a .txt file decides between the WikiText rule and the paragraph rule.
_SNIFF_CHARS = 1 << 20
#: The most characters read or tokenised at once: a longer line is read in parts, a longer
#: document is tokenised in pieces (see :mod:`llamascope_sdk.corpus`).
PIECE_CHARS = 1 << 16


def _not_utf8(path: Path | str, exc: UnicodeDecodeError) -> DataFormatError:
    """The error for a file that is not UTF-8, naming the first bad line (found by a second,
    binary pass: the fast text-mode reader decodes in chunks and does not know the line)."""
    line = 0
    if isinstance(path, Path):
        with path.open("rb") as fh:
            for line, raw in enumerate(fh, 1):  # noqa: B007 (line is read after the loop)
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    break
    where = f"line {line}: " if line else ""
    return DataFormatError(f"{path}: not UTF-8 text ({where}{exc.reason})",
                           hint="save it as UTF-8, e.g. iconv -t utf-8 FILE > FILE.utf8")


def _utf8_lines(fh: IO[str], path: Path) -> Iterator[str]:
    try:
        yield from fh
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None


class _Lines:
    """A text file's lines in parts of at most :data:`PIECE_CHARS` characters, one part of
    look-ahead. A part is (text, starts a line, ends a line)."""

    def __init__(self, fh: IO[str], path: Path | str) -> None:
        self.fh, self.path = fh, path
        self.line_start = True
        self.ahead: tuple[str, bool, bool] | None = None

    def peek(self) -> tuple[str, bool, bool] | None:
        if self.ahead is None:
            try:
                text = self.fh.readline(PIECE_CHARS)
            except UnicodeDecodeError as exc:
                raise _not_utf8(self.path, exc) from None
            if text:
                ends = text.endswith("\n")
                self.ahead = (text, self.line_start, ends)
                self.line_start = ends
        return self.ahead

    def take(self) -> tuple[str, bool, bool] | None:
        part = self.peek()
        self.ahead = None
        return part


#: What joins packed paragraphs.
_JOIN = "\n\n"


def _is_heading(part: tuple[str, bool, bool]) -> bool:
    return part[1] and bool(_HEADING.match(part[0].rstrip("\n")))


def _is_blank(part: tuple[str, bool, bool]) -> bool:
    return not part[0].strip()


def _txt_documents(fh: IO[str], pack_chars: int | None,
                   path: Path | str = "text") -> Iterator[Iterable[str]]:
    """Documents of a text file with the .txt rule, each a lazy iterable of pieces (the file
    is read as they are consumed; a dropped document is skipped over)."""
    try:
        head = fh.read(_SNIFF_CHARS)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from None
    lines = head.splitlines()[:-1] if len(head) == _SNIFF_CHARS else head.splitlines()
    wiki = sum(1 for ln in lines if _HEADING.match(ln)) >= 2
    fh.seek(0)
    src = _Lines(fh, path)
    while True:
        while (part := src.peek()) is not None and _is_blank(part):
            src.take()
        if part is None:
            return
        doc = _stripped(_article(src) if wiki else _paragraphs(src, pack_chars))
        yield doc
        for _ in doc:  # skip what the consumer left
            pass


def _article(src: _Lines) -> Iterator[str]:
    """From the current line up to the next top-level heading."""
    part = src.take()
    while part is not None:
        yield part[0]
        part = src.peek()
        if part is None or _is_heading(part):
            return
        src.take()


def _paragraphs(src: _Lines, pack_chars: int | None) -> Iterator[str]:
    """One paragraph (up to a blank line), or with ``pack_chars`` consecutive paragraphs
    joined by a blank line until they hold about that many characters (stripped)."""
    size = 0
    while True:
        first, last = True, ""
        while (part := src.peek()) is not None and not (part[1] and part[2] and _is_blank(part)):
            src.take()
            text = part[0].lstrip() if first else part[0]
            size += len(text)
            first, last = False, text
            yield text
        size -= len(last) - len(last.rstrip())
        if not pack_chars or size >= pack_chars:
            return
        while (part := src.peek()) is not None and _is_blank(part):
            src.take()
        if part is None:
            return
        yield _JOIN


def _stripped(pieces: Iterable[str]) -> Iterator[str]:
    """``pieces`` with the leading and trailing whitespace of their concatenation removed,
    and each paragraph's trailing whitespace before a blank-line join."""
    pending = ""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            if not piece:
                continue
            started = True
        if piece == _JOIN:  # between packed paragraphs (no line of a file is two newlines)
            pending = _JOIN
            continue
        body = piece.rstrip()
        if not body:
            pending += piece
            continue
        yield pending + body
        pending = piece[len(body):]
