"""Documents -> token rows: SlimPajama streamed from the Hub, or local .txt/.jsonl/.parquet.

The recipe (spec section 4): every document is tokenised on its own, BOS prepended, truncated
to ``context_size`` tokens (``concat_tokens=False``); special positions are dropped later, when
activations are gathered. The stream is resumable by document index, and split across
data-parallel ranks by document index (document i goes to rank i % world).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.errors import LlamascopeError

#: A top-level WikiText heading: " = Title = " (sub-headings use " = = ... = = ").
_HEADING = re.compile(r"^ ?= [^=].* = ?$")
#: Local text files without headings are split on blank lines, then consecutive paragraphs are
#: packed until a document reaches about this many characters (~ a 1024-token context).
_PACK_CHARS = 4000

SLIMPAJAMA = "cerebras/SlimPajama-627B"


class DataUnavailableError(LlamascopeError, ConnectionError):
    """The dataset cannot be read (offline, missing file, unsupported format)."""


def split_text(text: str, pack_chars: int = _PACK_CHARS) -> list[str]:
    """Split a plain-text corpus into documents.

    WikiText-style files (lines `` = Title = ``) are split at each top-level heading. Other
    files are split on blank lines and consecutive paragraphs are packed into documents of
    about ``pack_chars`` characters, so that short paragraphs (a Shakespeare speech) do not
    each become a document with its own BOS.
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


def _read_local(path: Path, text_field: str) -> list[str]:
    if not path.is_file():
        raise DataUnavailableError(f"dataset file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return split_text(path.read_text(encoding="utf-8"))
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            return [json.loads(ln)[text_field] for ln in fh if ln.strip()]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return [str(t) for t in pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()]
    raise DataUnavailableError(f"unsupported dataset file {path}: use .txt, .jsonl or .parquet, "
                               "or a Hugging Face dataset name")


def is_local(dataset: str) -> bool:
    return all(Path(p).suffix.lower() in {".txt", ".jsonl", ".parquet"} for p in dataset.split(","))


def local_documents(dataset: str, text_field: str = "text", holdout_fraction: float = 0.0,
                    heldout: bool = False) -> list[str]:
    """Documents of one or more local files (comma-separated). With ``holdout_fraction``, the
    last fraction of each file's documents is the held-out part (``heldout=True`` returns it)."""
    docs: list[str] = []
    for part in dataset.split(","):
        file_docs = _read_local(Path(part.strip()), text_field)
        cut = len(file_docs) - int(round(holdout_fraction * len(file_docs)))
        docs.extend(file_docs[cut:] if heldout else file_docs[:cut])
    return docs


def _hub_documents(dataset: str, split: str, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("streaming a Hub dataset needs `datasets`: "
                          "pip install 'llamascope-sdk[train]'") from exc
    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=True)
        for row in ds:
            yield row[text_field]
    except (ConnectionError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataUnavailableError(
            f"cannot stream dataset {dataset!r} (split {split!r}): {first}. "
            "The default SlimPajama needs network access to the Hugging Face Hub; offline, "
            "pass a local .txt/.jsonl/.parquet file with --set dataset=PATH") from None


class TokenSource:
    """Token rows [n, <=context] for one data-parallel rank, resumable by document index.

    Args:
        tokenizer: a transformers tokenizer.
        dataset: Hub name (streamed) or local file(s).
        rank, world: document i is used by rank ``i % world``.
        loop: restart from the first document when the stream ends (for small local corpora).
    """

    def __init__(self, tokenizer: Any, dataset: str, *, split: str = "train",
                 text_field: str = "text", context_size: int = 1024,
                 holdout_fraction: float = 0.0, rank: int = 0, world: int = 1,
                 loop: bool = True, split_long: bool = False) -> None:
        self.tokenizer = tokenizer
        self.dataset, self.split, self.text_field = dataset, split, text_field
        self.context_size = context_size
        self.rank, self.world, self.loop = rank, world, loop
        self.split_long = split_long
        self.position = 0  # documents consumed (global index over all ranks)
        self._local = (local_documents(dataset, text_field, holdout_fraction)
                       if is_local(dataset) else None)
        if self._local is not None and not self._local:
            raise DataUnavailableError(f"{dataset} holds no documents")

    def _documents(self, start: int) -> Iterator[tuple[int, str]]:
        if self._local is not None:
            i = start
            n = len(self._local)
            while self.loop or i < n:
                yield i, self._local[i % n]
                i += 1
            return
        for i, text in enumerate(_hub_documents(self.dataset, self.split, self.text_field)):
            if i >= start:
                yield i, text

    def encode(self, text: str) -> list[tuple[int, list[int]]]:
        """(offset in the document's tokens, row) pairs: BOS + the first context-1 tokens, or
        with ``split_long`` every (context-1)-token window, each with its own BOS."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = self.tokenizer.bos_token_id
        head = [] if bos is None else [bos]
        n = self.context_size - len(head)
        starts = range(0, max(len(ids), 1), n) if self.split_long else [0]
        return [(j, head + ids[j:j + n]) for j in starts]

    def batches(self, n_docs: int) -> Iterator[tuple[list[tuple[int, int]], list[list[int]]]]:
        """((document index, token offset) per row, token rows) of up to ``n_docs`` rows for
        this rank; advances :attr:`position` past the last document yielded."""
        docs: list[tuple[int, int]] = []
        batch: list[list[int]] = []
        for i, text in self._documents(self.position):
            self.position = i + 1
            if i % self.world != self.rank:
                continue
            for off, row in self.encode(text):
                if len(row) > 1:
                    docs.append((i, off))
                    batch.append(row)
            if len(batch) >= n_docs:
                yield docs, batch
                docs, batch = [], []
        if batch:
            yield docs, batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Right-pad token lists into a [n, max_len] tensor (pad positions are dropped later)."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out
