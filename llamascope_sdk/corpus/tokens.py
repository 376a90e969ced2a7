"""Documents -> sequences -> batches: tokenising piece by piece, THE BOS-and-cut rule
(:func:`split_document`), and padded batches (the rules are in :mod:`llamascope_sdk.corpus`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.corpus.documents import CorpusSource, ReadCounts, document_pieces
from llamascope_sdk.corpus.textfile import PIECE_CHARS

#: Sequences sorted by length together before batching, in units of batch_size (less padding):
#: each pool gives SORT_POOL batches (the last pool fewer).
SORT_POOL = 16

Rule = Literal["windows", "first"]
#: The two BOS-and-cut rules, as stated in a feature store's or an evaluation's metadata.
RULES: dict[str, str] = {
    "windows": "each document is split into consecutive windows of `context` tokens: every "
               "window is BOS followed by the next context-1 tokens of the document (the last "
               "may be shorter); positions count from the document's start (BOS = 0)",
    "first": "one sequence per document: BOS followed by the document's first context-1 "
             "tokens; the rest of the document is not read",
}


@dataclass
class Sequence:
    """One model input: ``ids`` (BOS first) from document ``doc`` (its index in the corpus,
    counting every document), whose first id sits at document position ``pos``; ``part`` is
    its index among its document's sequences and ``last`` says that no later sequence of its
    document is read (mining holds a document's examples back until it is read whole)."""

    doc: int
    pos: int
    ids: list[int]
    part: int = 0
    last: bool = True


@dataclass
class Batch:
    """Right-padded sequences: ``ids`` [B, T], ``valid`` [B, T] (False on padding), and per row
    ``doc`` [B] (document index), ``pos`` [B] (document position of column 0) and ``order``
    [B] (corpus ordinal of column 0: ids of all sequences counted in reading order), ``part``
    [B] and ``last`` [B] (see :class:`Sequence`)."""

    ids: torch.Tensor
    valid: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    order: torch.Tensor
    part: torch.Tensor | None = None
    last: torch.Tensor | None = None
    lengths: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = self.valid.sum(1)




# ---------------------------------------------------------------------------- tokens
def pieces(text: str) -> Iterator[str]:
    """``text`` in consecutive slices of at most :data:`PIECE_CHARS` characters."""
    for i in range(0, len(text), PIECE_CHARS):
        yield text[i:i + PIECE_CHARS]


def _cut_point(text: str) -> int:
    """Where to end a piece of ``text`` (longer than PIECE_CHARS): before the last space in
    its second half that has a non-space character on each side, else at PIECE_CHARS."""
    i = PIECE_CHARS
    while (i := text.rfind(" ", PIECE_CHARS // 2, i)) > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i
    return PIECE_CHARS


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def document_tokens(tokenizer: Any, text_pieces: Iterable[str]) -> Iterator[list[int]]:
    """The token ids of one document, a piece at a time: the pieces are joined and cut again
    at safe points (see the module docstring) before at most :data:`PIECE_CHARS` characters,
    so a text up to that length is tokenised in one call."""
    parts: list[str] = []
    size = 0
    for piece in text_pieces:
        parts.append(piece)
        size += len(piece)
        if size > PIECE_CHARS:
            buf = "".join(parts)
            while len(buf) > PIECE_CHARS:
                cut = _cut_point(buf)
                yield _ids(tokenizer, buf[:cut])
                buf = buf[cut:]
            parts, size = [buf], len(buf)
    if size:
        yield _ids(tokenizer, "".join(parts))


def bos_ids(tokenizer: Any) -> list[int]:
    """``[BOS]``, or ``[]`` for a tokenizer without one: what every sequence starts with."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [] if bos is None else [int(bos)]


def check_context(context: int, tokenizer: Any) -> int:
    """The number of document tokens per sequence (``context`` less the BOS), at least 1.

    Raises:
        InputError: ``context`` too small to hold the BOS and one token.
    """
    n = int(context) - len(bos_ids(tokenizer))
    if isinstance(context, bool) or n < 1:
        least = len(bos_ids(tokenizer)) + 1
        raise InputError(f"context={context!r} is too small: a sequence needs at least {least} "
                         "tokens (the BOS and one token of the document)")
    return n


def split_document(tokenizer: Any, text: str | Iterable[str], context: int | None, *,
                   rule: Rule = "windows", bos: bool = True,
                   counts: ReadCounts | None = None) -> Iterator[tuple[int, list[int]]]:
    """(document position of the first id, ids) of each sequence of one document: THE
    BOS-and-cut rule (see the module docstring). ``context=None`` means no cut (one sequence
    with every token); ``bos=False`` leaves the BOS out. A document without tokens gives
    nothing."""
    if rule not in RULES:
        raise InputError(f"unknown rule {rule!r}: allowed are {', '.join(RULES)}")
    head = bos_ids(tokenizer) if bos else []
    n = check_context(context, tokenizer) if context is not None else None
    counts = counts if counts is not None else ReadCounts()
    tokens = document_tokens(tokenizer, pieces(text) if isinstance(text, str) else text)
    buf: list[int] = []
    offset = 0  # index in the document of buf's first token; it sits at position offset + 1
    for ids in tokens:
        counts.tokens_available += len(ids)
        buf.extend(ids)
        while n is not None and len(buf) >= n:
            yield offset + 1 - len(head), head + buf[:n]
            if rule == "first":
                counts.documents_cut += len(buf) > n or next(tokens, None) is not None
                return
            buf, offset = buf[n:], offset + n
    if buf:
        yield offset + 1 - len(head), head + buf


def sequences(tokenizer: Any, docs: CorpusSource | Iterable[str], *, context: int,
              tokens: int | None = None, rule: Rule = "windows", split: str = "train",
              text_field: str = "text", counts: ReadCounts | None = None) -> Iterator[Sequence]:
    """Every sequence of a corpus in reading order, at most ``tokens`` ids in all (BOS
    included; None: the whole corpus).

    Args:
        docs: as ``source`` of :func:`iter_documents`.
        context: ids per sequence, BOS included.
        rule: ``"windows"`` or ``"first"`` (see :data:`RULES`).
        counts: filled in as the sequences are read (see :class:`ReadCounts`).
    """
    if tokens is not None and (isinstance(tokens, bool) or int(tokens) < 1):
        raise InputError(f"tokens={tokens!r}: the token budget must be at least 1")
    check_context(context, tokenizer)
    counts = counts if counts is not None else ReadCounts()
    left = tokens
    n_bos = len(bos_ids(tokenizer))
    for i, doc in enumerate(document_pieces(docs, split, text_field, None, counts)):
        counts.documents = i + 1
        split_up = split_document(tokenizer, doc, context, rule=rule, counts=counts)
        nxt, part = next(split_up, None), 0
        while nxt is not None:
            pos, ids = nxt
            counts.sequences += 1
            if left is not None and len(ids) >= left:
                seq = ids[:left]
                counts.tokens_read += len(seq) - n_bos
                # Read to its end only if nothing is cut here and nothing follows.
                counts.documents_cut += len(ids) > left or next(split_up, None) is not None
                yield Sequence(i, pos, seq, part, True)
                return
            counts.tokens_read += len(ids) - n_bos
            if left is not None:
                left -= len(ids)
            nxt = next(split_up, None)  # one sequence ahead: is this the document's last?
            yield Sequence(i, pos, ids, part, nxt is None)
            part += 1
    counts.exhausted = True


def batches(tokenizer: Any, docs: CorpusSource | Iterable[str], *, tokens: int | None, context: int,
            batch_size: int, rule: Rule = "windows", split: str = "train",
            text_field: str = "text", counts: ReadCounts | None = None) -> Iterator[Batch]:
    """:func:`sequences` in batches of ``batch_size`` rows; the sequences of each pool of
    ``16 * batch_size`` are sorted by length first (less padding), so rows are not in reading
    order: ``Batch.doc``/``pos``/``order`` say where each came from."""
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise InputError(f"batch_size={batch_size!r}: must be at least 1")
    pad = pad_id(tokenizer)
    pool: list[tuple[int, Sequence]] = []
    order = 0
    for seq in sequences(tokenizer, docs, context=context, tokens=tokens, rule=rule,
                         split=split, text_field=text_field, counts=counts):
        pool.append((order, seq))
        order += len(seq.ids)
        if len(pool) == batch_size * SORT_POOL:
            yield from _emit(pool, batch_size, pad)
            pool = []
    yield from _emit(pool, batch_size, pad)


def _emit(pool: list[tuple[int, Sequence]], batch_size: int, pad: int) -> Iterator[Batch]:
    pool = sorted((p for p in pool if p[1].ids), key=lambda p: len(p[1].ids))
    for i in range(0, len(pool), batch_size):
        part = pool[i:i + batch_size]
        ids = pad_rows([s.ids for _, s in part], pad)
        lengths = torch.tensor([len(s.ids) for _, s in part])
        valid = torch.arange(ids.shape[1])[None] < lengths[:, None]
        yield Batch(ids, valid, torch.tensor([s.doc for _, s in part]),
                    torch.tensor([s.pos for _, s in part]), torch.tensor([o for o, _ in part]),
                    torch.tensor([s.part for _, s in part]),
                    torch.tensor([s.last for _, s in part], dtype=torch.bool))


def token_batches(tokenizer: Any, docs: CorpusSource | Iterable[str], *, tokens: int, context: int,
                  batch_size: int, pack: bool = False, rule: Rule = "first",
                  counts: ReadCounts | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids [B, T], valid [B, T] bool) batches holding at most ``tokens`` ids: the
    :func:`batches` of ``rule`` (evaluation's default is ``"first"``, the recipe's), or with
    ``pack`` documents joined by EOS and cut into sequences of exactly ``context`` ids, each
    BOS first (for long-context checks on short documents)."""
    if not pack:
        for b in batches(tokenizer, docs, tokens=tokens, context=context, batch_size=batch_size,
                         rule=rule, counts=counts):
            yield b.ids, b.valid
        return
    pad = pad_id(tokenizer)
    left, pool = tokens, []
    for ids in _packed(tokenizer, docs, context):
        ids = ids[:left]
        left -= len(ids)
        pool.append((0, Sequence(0, 0, ids)))
        if len(pool) == batch_size * SORT_POOL or left <= 0:
            yield from ((b.ids, b.valid) for b in _emit(pool, batch_size, pad))
            pool = []
        if left <= 0:
            return
    yield from ((b.ids, b.valid) for b in _emit(pool, batch_size, pad))


def _packed(tokenizer: Any, docs: CorpusSource | Iterable[str], context: int) -> Iterator[list[int]]:
    """Every document's tokens followed by EOS, in one stream cut into full sequences, each
    BOS followed by context-1 tokens (a final partial sequence is dropped)."""
    head, n = bos_ids(tokenizer), check_context(context, tokenizer)
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    for doc in document_pieces(docs, "train", "text", None, ReadCounts()):
        for ids in document_tokens(tokenizer, doc):
            buf += ids
            while len(buf) >= n:
                yield head + buf[:n]
                buf = buf[n:]
        buf += [] if eos is None else [eos]
        while len(buf) >= n:
            yield head + buf[:n]
            buf = buf[n:]


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


def encode(tokenizer: Any, text: str, *, bos: bool = True, context: int | None = None) -> list[int]:
    """One text's ids by the ``"first"`` rule: BOS first (unless ``bos=False``), cut to
    ``context`` ids (``None``: no cut). What :func:`~llamascope_sdk.loading.models.tokenize` uses."""
    for _, ids in split_document(tokenizer, text, context, rule="first", bos=bos):
        return ids
    return bos_ids(tokenizer) if bos else []


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
