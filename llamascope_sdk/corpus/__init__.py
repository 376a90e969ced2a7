"""Text corpora: the one path from text to token batches, documents -> sequences -> batches.

:mod:`.documents` reads documents, :mod:`.tokens` turns them into sequences and batches;
everything is imported from here (``from llamascope_sdk.corpus import batches``).

**Documents** (:func:`iter_documents`) come from local .txt/.jsonl/.parquet files, a streamed
Hugging Face dataset, or an iterable of strings. Files are read incrementally, so memory does
not grow with the file: a .txt file line by line (a long line in parts of
:data:`PIECE_CHARS` characters), a .jsonl file row by row, a .parquet file row group by row
group. The .txt rule: a WikiText-style file (at least two top-level headings `` = Title = `` in
its first MiB) is split into one document per article, at each heading; any other text at
blank lines into paragraphs (``pack_chars`` joins consecutive paragraphs up to about that many
characters; training does). Every document is stripped; empty ones are dropped.

**Text values** of .jsonl rows, .parquet columns and dataset rows must be strings: a ``null``
(``None``) is skipped like an empty text and counted (:attr:`ReadCounts.null_rows`, one line on
stderr per file); any other type (a number, a list, bytes, an object) is refused with the row
number, as a :class:`~llamascope_sdk.base.errors.DataFormatError`.

**Sequences** (:func:`sequences`): every document is tokenised piece by piece (a document is
cut into pieces of at most :data:`PIECE_CHARS` characters at a space between two non-space
characters, where byte-level BPE tokenizers such as Llama-3's and SmolLM2's never merge across,
so the ids equal those of tokenising it whole; shorter documents are tokenised in one call), and
cut by one of two rules (:data:`RULES`), each sequence starting with the tokenizer's BOS:

* ``"windows"`` (mining): the document is split into consecutive windows; each window is BOS
  followed by the next ``context - 1`` tokens of the document (the last window may be
  shorter), so every token of the document is read.
* ``"first"`` (the recipe's evaluation and training): one sequence per document, BOS followed
  by its first ``context - 1`` tokens; the rest of the document is not read (not tokenised
  either, beyond the piece it lies in).

Positions refer to the document: BOS is position 0 and the document's j-th token (from 0) is
position j + 1, in every window; :attr:`Sequence.pos` is the position of the sequence's first
id, so id c of a sequence sits at ``pos + c`` (a later window's BOS takes the position of the
token before it, which is never a real token anywhere). A budget of ``tokens`` counts every id,
BOS included, and cuts the last sequence short.

**Batches** (:func:`batches`): sequences of a pool of ``16 * batch_size`` are sorted by length
(less padding) and right-padded with :func:`pad_id`.
"""

from __future__ import annotations

from llamascope_sdk.corpus.documents import (
    SUFFIXES,
    CorpusSource,
    LocalDocuments,
    ReadCounts,
    check_corpus,
    file_documents,
    hub_documents,
    iter_documents,
    local_documents,
    local_paths,
    split_text,
)
from llamascope_sdk.corpus.textfile import PIECE_CHARS
from llamascope_sdk.corpus.tokens import (
    RULES,
    SORT_POOL,
    Batch,
    Rule,
    Sequence,
    batches,
    bos_ids,
    check_context,
    document_tokens,
    encode,
    pad_id,
    pad_rows,
    sequences,
    split_document,
    tensor_batches,
    token_batches,
)

__all__ = ["PIECE_CHARS", "RULES", "SORT_POOL", "SUFFIXES", "Batch", "LocalDocuments", "ReadCounts", "Rule", "Sequence", "CorpusSource",
           "batches", "bos_ids", "check_context", "check_corpus", "document_tokens", "encode", "file_documents",
           "hub_documents", "iter_documents", "local_documents", "local_paths", "pad_id",
           "pad_rows", "sequences", "split_document", "split_text", "tensor_batches",
           "token_batches"]
