"""Documents of a corpus: local .txt/.jsonl/.parquet files read incrementally, a streamed
Hugging Face dataset, or an iterable of strings (the rules are in :mod:`llamascope_sdk.corpus`).

Internally a document is an iterable of text pieces (:func:`document_pieces`), so a .txt
paragraph of any length is never held whole; :func:`iter_documents` joins each into a string.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import (
    DataFileNotFoundError,
    DataFormatError,
    DatasetStreamError,
    TextFieldError,
)
from llamascope_sdk.corpus.textfile import _txt_documents, _utf8_lines

#: File suffixes read as local corpora; anything else that is not an existing file is taken
#: to be a Hugging Face dataset name.
SUFFIXES = (".txt", ".jsonl", ".parquet")
#: Suffixes read as plain text (an existing file without a suffix is plain text too).
_TEXT_SUFFIXES = {".txt", ".md", ""}

CorpusSource = str | os.PathLike[str]


@dataclass
class ReadCounts:
    """What a pass over a corpus read; filled in while :func:`sequences` or :func:`batches`
    run (pass one as ``counts=``).

    ``tokens_read`` counts document tokens placed in sequences (BOS not counted);
    ``tokens_available`` the document tokens tokenised in the documents started, so
    ``tokens_available - tokens_read`` is what the ``"first"`` rule cut off or the budget left
    in the last document (a document longer than :data:`PIECE_CHARS` characters is tokenised
    only as far as it is read, so its untouched rest is not counted). ``documents_cut`` counts
    documents not read to their end; ``exhausted`` is True when the corpus ended before the
    budget.
    """

    documents: int = 0
    sequences: int = 0
    tokens_read: int = 0
    tokens_available: int = 0
    documents_cut: int = 0
    null_rows: int = 0
    exhausted: bool = False

    def as_dict(self) -> dict[str, int | bool]:
        return dict(self.__dict__)



# ---------------------------------------------------------------------------- documents
def split_text(text: str, pack_chars: int | None = None) -> list[str]:
    """Split plain text into documents with the .txt rule (see the module docstring).

    Args:
        text: the whole text.
        pack_chars: for text without headings, join consecutive paragraphs until a document
            reaches about this many characters; ``None`` keeps one document per paragraph.

    Returns:
        The non-empty documents, in order (articles keep their heading line).
    """
    import io

    fh = io.StringIO(text, newline=None)
    return ["".join(d) for d in _txt_documents(fh, pack_chars)]


def local_paths(source: CorpusSource) -> list[Path] | None:
    """The files ``source`` names (one path, or several joined by commas), or ``None`` when it
    is a Hugging Face dataset name. A part counts as a file if it exists or has a suffix in
    :data:`SUFFIXES`; whether it exists is checked when it is read."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_file() or isinstance(source, os.PathLike):
        return [path]
    parts = [Path(p.strip()).expanduser() for p in str(source).split(",")]
    if all(p.is_file() or p.suffix.lower() in SUFFIXES for p in parts):
        return parts
    return None


def file_documents(path: Path, text_field: str = "text", pack_chars: int | None = None) -> list[str]:
    """The non-empty documents of one local file, in a list (all of them in memory).

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataFormatError: the suffix is not .txt/.jsonl/.parquet, or a text value is not a string.
        TextFieldError: a .jsonl row or the parquet table lacks ``text_field``.
    """
    return ["".join(d) for d in _file_documents(path, text_field, pack_chars, ReadCounts())]


def check_corpus(source: CorpusSource | Iterable[str]) -> None:
    """Check a corpus before any long work: every local file it names exists and has a type
    that can be read (a dataset name is checked when it is streamed).

    Raises:
        DataFileNotFoundError: a named file does not exist.
        DataFormatError: a file of an unsupported type.
    """
    if not isinstance(source, str | os.PathLike):
        return
    for path in local_paths(source) or []:
        if not path.is_file():
            raise DataFileNotFoundError(f"dataset file {path} does not exist",
                                        hint="check the path (several files: a,b,c)")
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".parquet") and suffix not in _TEXT_SUFFIXES:
            raise DataFormatError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl "
                                  "or .parquet, or a Hugging Face dataset name")


class LocalDocuments:
    """The documents of local files (comma-separated), minus or only the hold-out, streamed:
    ``len()`` is known up front (one counting pass over the files, in bounded memory) and each
    ``iter()`` reads the files again, so a corpus of any size can be looped over.

    Args:
        source: a path, or several joined by commas.
        holdout_fraction: the last this fraction of each file's documents is held out.
        heldout: give the held-out documents instead of the rest.
        pack_chars: as in :func:`split_text`.

    Raises:
        DataFileNotFoundError, DataFormatError, TextFieldError: as :func:`file_documents`.
    """

    def __init__(self, source: CorpusSource, text_field: str = "text", *,
                 holdout_fraction: float = 0.0, heldout: bool = False,
                 pack_chars: int | None = None) -> None:
        paths = local_paths(source)
        if paths is None:
            raise DataFileNotFoundError(f"{source!r} is not a local {'/'.join(SUFFIXES)} file")
        self.text_field, self.pack_chars = text_field, pack_chars
        self.ranges: list[tuple[Path, int, int]] = []  # (file, first, stop) document indices
        for path in paths:
            n = sum(1 for _ in _file_documents(path, text_field, pack_chars, ReadCounts()))
            cut = n - int(round(holdout_fraction * n))
            self.ranges.append((path, cut, n) if heldout else (path, 0, cut))

    def __len__(self) -> int:
        return sum(stop - first for _, first, stop in self.ranges)

    def __iter__(self) -> Iterator[str]:
        for path, first, stop in self.ranges:
            for j, doc in enumerate(_file_documents(path, self.text_field, self.pack_chars,
                                                    ReadCounts())):
                if j >= stop:
                    break
                if j >= first:
                    yield "".join(doc)


def local_documents(source: CorpusSource, text_field: str = "text", *,
                    holdout_fraction: float = 0.0, heldout: bool = False,
                    pack_chars: int | None = None) -> list[str]:
    """:class:`LocalDocuments` in a list (all of them in memory)."""
    return list(LocalDocuments(source, text_field, holdout_fraction=holdout_fraction,
                               heldout=heldout, pack_chars=pack_chars))


def hub_documents(name: str, split: str = "train", text_field: str = "text",
                  counts: ReadCounts | None = None) -> Iterator[str]:
    """Stream the ``text_field`` of a Hugging Face dataset (needs ``datasets``); null texts
    are skipped (counted in ``counts``), empty ones dropped.

    Raises:
        ImportError: ``datasets`` is not installed.
        DatasetStreamError: the dataset cannot be opened or streamed (offline, wrong name/split).
        TextFieldError: a row lacks ``text_field``.
        DataFormatError: a row's text is not a string.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("streaming a Hugging Face dataset needs the `datasets` package: "
                          "pip install 'llamascope-sdk[train]'") from exc
    counts = counts if counts is not None else ReadCounts()
    try:
        rows = iter(datasets.load_dataset(name, split=split, streaming=True))
        for n, row in enumerate(rows):
            text = _text_of(row, text_field, f"{name}[{split}] row {n}", counts)
            if text:
                yield text
    except (ConnectionError, OSError, ValueError) as exc:  # datasets' not-found/offline errors
        if isinstance(exc, DataFormatError):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetStreamError(
            f"cannot stream dataset {name!r} (split {split!r}): {first}. Streaming needs access "
            "to the Hugging Face Hub; offline, pass a local .txt/.jsonl/.parquet file instead",
            hint="check the name, the split and HF_HUB_OFFLINE; in training: "
                 "--set dataset=PATH") from None


def iter_documents(source: CorpusSource | Iterable[str], *, split: str = "train",
                   text_field: str = "text", pack_chars: int | None = None,
                   counts: ReadCounts | None = None) -> Iterator[str]:
    """Documents from local file(s), a Hugging Face dataset name, or an iterable of strings.

    Files are streamed; each document is one string (see :func:`sequences` for reading a
    corpus whose documents are too long to hold).

    Args:
        source: a .txt/.jsonl/.parquet path (or several, comma-separated), a dataset name
            (streamed; ``split`` and ``text_field`` pick the rows) or strings used as given.
        pack_chars: as in :func:`split_text` (default: one document per paragraph).
        counts: if given, its ``null_rows`` counts the rows skipped for a null text.

    Raises:
        DataFileNotFoundError (a FileNotFoundError), DataFormatError, TextFieldError (a
        KeyError), DatasetStreamError, ImportError: see :func:`file_documents` and
        :func:`hub_documents`; TypeError: an iterable item that is not a string.

    Example:
        >>> next(iter_documents("corpus/wikitext2-valid.txt"))[:18]
        '= Robert Boulter ='
    """
    for doc in document_pieces(source, split, text_field, pack_chars, counts or ReadCounts()):
        yield "".join(doc)


def document_pieces(source: CorpusSource | Iterable[str], split: str, text_field: str,
               pack_chars: int | None, counts: ReadCounts) -> Iterator[Iterable[str]]:
    """Every document as an iterable of text pieces (consume or drop it before the next)."""
    if isinstance(source, str | os.PathLike):
        paths = local_paths(source)
        if paths is None:
            yield from ([d] for d in hub_documents(str(source), split, text_field, counts))
            return
        for path in paths:
            yield from _file_documents(path, text_field, pack_chars, counts)
        return
    if isinstance(source, bytes):
        raise TypeError("the corpus must be a path, a dataset name or an iterable of strings, "
                        "not bytes")
    for n, doc in enumerate(source):
        if not isinstance(doc, str):
            raise TypeError(f"documents must be strings, got {type(doc).__name__} at position {n}")
        yield [doc]


def _file_documents(path: Path, text_field: str, pack_chars: int | None,
                    counts: ReadCounts) -> Iterator[Iterable[str]]:
    if not path.is_file():
        raise DataFileNotFoundError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    before = counts.null_rows
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for n, line in enumerate(_utf8_lines(fh, path), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path}:{n}: not a JSON line ({exc.msg}); each line "
                                          "must be a JSON object or string") from None
                text = row if isinstance(row, str) else _text_of(row, text_field, f"{path}:{n}", counts)
                if text:
                    yield [text]
    elif suffix == ".parquet":
        yield from _parquet_documents(path, text_field, counts)
    elif suffix in _TEXT_SUFFIXES:
        with path.open(encoding="utf-8") as fh:
            yield from _txt_documents(fh, pack_chars, path)
    else:
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or "
                              ".parquet, or a Hugging Face dataset name")
    if counts.null_rows > before:
        k = counts.null_rows - before
        sys.stderr.write(f"corpus: skipped {k} row{'s' * (k != 1)} of {path} whose "
                         f"{text_field!r} is null\n")


def _parquet_documents(path: Path, text_field: str, counts: ReadCounts) -> Iterator[Iterable[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"{path}: not a readable Parquet file "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                              hint="check the file, or pass .txt/.jsonl") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise TextFieldError(f"{path}: no {text_field!r} column (found {names[:5]}); "
                             "pass text_field=")
    kind = pf.schema_arrow.field(text_field).type
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        col = batch.column(0)
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            first = next((i for i, v in enumerate(col.to_pylist()) if v is not None), None)
            if first is not None:
                raise DataFormatError(
                    f"{path}: row {n + first + 1}: column {text_field!r} holds {kind}, not text; "
                    "the text column must hold strings (pass text_field=)")
        for text in col.to_pylist():
            n += 1
            if text is None:
                counts.null_rows += 1
            elif text:
                yield [text]


def _text_of(row: Any, text_field: str, where: str, counts: ReadCounts) -> str | None:
    """The text of one dataset row, None for a null text; refuses anything but a string."""
    if not isinstance(row, dict) or text_field not in row:
        keys = list(row)[:5] if isinstance(row, dict) else type(row).__name__
        raise TextFieldError(f"{where}: no {text_field!r} field (found {keys}); pass text_field=")
    text = row[text_field]
    if text is None:
        counts.null_rows += 1
        return None
    if not isinstance(text, str):
        raise DataFormatError(f"{where}: {text_field!r} is {type(text).__name__} "
                              f"({_short(text)}), not a string; every text must be a string "
                              "(null rows are skipped)")
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
