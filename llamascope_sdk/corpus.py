"""Text corpora: documents from local .txt/.jsonl/.parquet files or a streamed Hugging Face
dataset, the held-out split of local files, and token batches for evaluation.

Evaluation (:mod:`llamascope_sdk.evaluation`) and training (:mod:`llamascope_sdk.training.data`)
read text through this one module, so a file means the same documents to both.

The .txt rule (:func:`split_text`): a WikiText-style file (at least two top-level headings
`` = Title = ``, as in the corpus README) is split into one document per article, at each
heading; any other text is split at blank lines into paragraphs. ``pack_chars`` optionally joins
consecutive paragraphs up to about that many characters (training does, so that a short
Shakespeare speech does not become a sequence of its own with its own BOS).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import DataFileNotFoundError, DataFormatError, DatasetStreamError, TextFieldError

#: File suffixes read as local corpora; anything else that is not an existing file is taken
#: to be a Hugging Face dataset name.
SUFFIXES = (".txt", ".jsonl", ".parquet")
#: Suffixes read as plain text (an existing file without a suffix is plain text too).
_TEXT_SUFFIXES = {".txt", ".md", ""}
#: A top-level WikiText heading: " = Title = " (sub-headings use " = = ... = = ").
_HEADING = re.compile(r"^ ?= [^=].* = ?$")
#: Documents sorted by length together before batching, in units of batch_size (less padding).
_SORT_POOL = 16

Source = str | os.PathLike[str]


# ---------------------------------------------------------------------------- documents
def split_text(text: str, pack_chars: int | None = None) -> list[str]:
    """Split plain text into documents: at `` = Title = `` headings, else at blank lines.

    Args:
        text: the whole file.
        pack_chars: for text without headings, join consecutive paragraphs until a document
            reaches about this many characters; ``None`` keeps one document per paragraph.

    Returns:
        The non-empty documents, in order (articles keep their heading line).
    """
    lines = text.splitlines()
    if sum(1 for ln in lines if _HEADING.match(ln)) >= 2:
        docs: list[list[str]] = []
        for ln in lines:
            if _HEADING.match(ln) or not docs:
                docs.append([])
            docs[-1].append(ln)
        return [d for d in ("\n".join(x).strip() for x in docs) if d]
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not pack_chars:
        return paras
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paras:
        cur.append(p)
        size += len(p)
        if size >= pack_chars:
            out.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def local_paths(source: Source) -> list[Path] | None:
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
    """The non-empty documents of one local file (see :func:`split_text` for .txt).

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataFormatError: the suffix is not .txt/.jsonl/.parquet.
        TextFieldError: a .jsonl row or the parquet table lacks ``text_field``.
    """
    if not path.is_file():
        raise DataFileNotFoundError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            rows = [(n, json.loads(ln)) for n, ln in enumerate(fh, 1) if ln.strip()]
        docs = [r if isinstance(r, str) else _field(r, text_field, f"{path}:{n}") for n, r in rows]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise TextFieldError(f"{path}: no {text_field!r} column (found {schema.names[:5]}); "
                                 "pass text_field=")
        docs = [str(t) for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
                if t]
    elif suffix in _TEXT_SUFFIXES:
        docs = split_text(path.read_text(encoding="utf-8"), pack_chars)
    else:
        raise DataFormatError(f"{path}: unsupported file type {suffix!r}; use .txt, .jsonl or "
                              ".parquet, or a Hugging Face dataset name")
    return [d for d in docs if d]


def local_documents(source: Source, text_field: str = "text", *, holdout_fraction: float = 0.0,
                    heldout: bool = False, pack_chars: int | None = None) -> list[str]:
    """Documents of one or more local files (comma-separated), minus or only the hold-out.

    Args:
        source: a path, or several joined by commas.
        holdout_fraction: the last this fraction of each file's documents is held out.
        heldout: return the held-out documents instead of the rest.
        pack_chars: as in :func:`split_text`.

    Raises:
        DataFileNotFoundError, DataFormatError, TextFieldError: as :func:`file_documents`.
    """
    paths = local_paths(source)
    if paths is None:
        raise DataFileNotFoundError(f"{source!r} is not a local {'/'.join(SUFFIXES)} file")
    docs: list[str] = []
    for path in paths:
        file_docs = file_documents(path, text_field, pack_chars)
        cut = len(file_docs) - int(round(holdout_fraction * len(file_docs)))
        docs.extend(file_docs[cut:] if heldout else file_docs[:cut])
    return docs


def hub_documents(name: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """Stream the ``text_field`` of a Hugging Face dataset (needs ``datasets``).

    Raises:
        ImportError: ``datasets`` is not installed.
        DatasetStreamError: the dataset cannot be opened or streamed (offline, wrong name/split).
        TextFieldError: a row lacks ``text_field``.
    """
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("streaming a Hugging Face dataset needs the `datasets` package: "
                          "pip install 'llamascope-sdk[train]'") from exc
    try:
        rows = iter(datasets.load_dataset(name, split=split, streaming=True))
        for n, row in enumerate(rows):
            yield _field(row, text_field, f"{name}[{split}][{n}]")
    except (ConnectionError, OSError, ValueError) as exc:  # datasets' not-found/offline errors
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetStreamError(
            f"cannot stream dataset {name!r} (split {split!r}): {first}. Streaming needs access "
            "to the Hugging Face Hub; offline, pass a local .txt/.jsonl/.parquet file instead",
            hint="check the name, the split and HF_HUB_OFFLINE; in training: "
                 "--set dataset=PATH") from None


def _field(row: Any, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        keys = list(row)[:5] if isinstance(row, dict) else type(row).__name__
        raise TextFieldError(f"{where}: no {text_field!r} field (found {keys}); pass text_field=")
    return str(row[text_field])


def iter_documents(source: Source | Iterable[str], *, split: str = "train",
                   text_field: str = "text", pack_chars: int | None = None) -> Iterator[str]:
    """Documents from local file(s), a Hugging Face dataset name, or an iterable of strings.

    Args:
        source: a .txt/.jsonl/.parquet path (or several, comma-separated), a dataset name
            (streamed; ``split`` and ``text_field`` pick the rows) or strings used as given.
        pack_chars: as in :func:`split_text` (default: one document per paragraph).

    Raises:
        DataFileNotFoundError (a FileNotFoundError), DataFormatError, TextFieldError (a
        KeyError), DatasetStreamError, ImportError: see :func:`file_documents` and
        :func:`hub_documents`.

    Example:
        >>> next(iter_documents("corpus/wikitext2-valid.txt"))[:20]
        ' = Robert Boulter = '
    """
    if isinstance(source, str | os.PathLike):
        paths = local_paths(source)
        if paths is None:
            yield from hub_documents(str(source), split, text_field)
            return
        for path in paths:
            yield from file_documents(path, text_field, pack_chars)
        return
    for doc in source:
        if not isinstance(doc, str):
            raise TypeError(f"documents must be strings, got {type(doc).__name__}")
        yield doc


# ---------------------------------------------------------------------------- tokens
def token_batches(tokenizer: Any, docs: Iterable[str], *, tokens: int, context: int,
                  batch_size: int, pack: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [B, T], valid [B, T] bool) batches holding at most ``tokens`` real tokens.

    Every sequence starts with BOS. Without ``pack`` each document is one sequence, truncated
    to ``context`` (the recipe's way); with ``pack`` documents are joined by EOS and cut into
    sequences of exactly ``context`` tokens (for long-context checks on short documents).
    """
    seqs = (_packed(tokenizer, docs, context) if pack
            else (ids for _, ids in document_sequences(tokenizer, docs, context)))
    pad = pad_id(tokenizer)
    left, pool = tokens, []
    for ids in seqs:
        ids = ids[:left]
        left -= len(ids)
        pool.append(ids)
        if len(pool) == batch_size * _SORT_POOL or left <= 0:
            yield from _emit(pool, batch_size, pad)
            pool = []
        if left <= 0:
            return
    yield from _emit(pool, batch_size, pad)


def document_sequences(tokenizer: Any, docs: Iterable[str],
                       context: int) -> Iterator[tuple[int, list[int]]]:
    """(document index, token ids) per non-empty document: BOS first, cut to ``context``
    tokens (the recipe's one-document-per-sequence rule). The index counts every document."""
    bos = tokenizer.bos_token_id
    for i, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if ids:
            yield i, ([bos] if bos is not None else []) + ids[: context - (bos is not None)]


def _packed(tokenizer: Any, docs: Iterable[str], context: int) -> Iterator[list[int]]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    buf: list[int] = []
    for doc in docs:
        buf += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        while len(buf) >= context - len(head):
            yield head + buf[: context - len(head)]
            buf = buf[context - len(head):]


def tensor_batches(ids: torch.Tensor, tokens: int, context: int,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, all-True valid) batches of token rows used as given: rows cut to ``context``,
    at most ``tokens`` tokens in all (at least one row)."""
    if ids.dim() != 2:
        raise ValueError(f"token ids must be [batch, seq], got shape {list(ids.shape)}")
    ids = ids[:, :context].long()
    rows = max(1, min(ids.shape[0], tokens // max(1, ids.shape[1])))
    for i in range(0, rows, batch_size):
        chunk = ids[i:min(i + batch_size, rows)]
        yield chunk, torch.ones_like(chunk, dtype=torch.bool)


def pad_id(tokenizer: Any) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (Llama-3.1 and the
    SmolLM2 GGUF tokenizer have no pad token), else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


def pad_rows(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Right-pad token lists into a [n, max_len] LongTensor."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _emit(pool: list[list[int]], batch_size: int, pad: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pool = sorted((p for p in pool if p), key=len)
    for i in range(0, len(pool), batch_size):
        rows = pool[i:i + batch_size]
        ids = pad_rows(rows, pad)
        valid = torch.arange(ids.shape[1])[None] < torch.tensor([len(r) for r in rows])[:, None]
        yield ids, valid
