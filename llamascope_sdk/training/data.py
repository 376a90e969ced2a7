"""Documents -> token rows for training: SlimPajama streamed from the Hub, or local files.

Documents are read by :mod:`llamascope_sdk.corpus` (the same rules as evaluation); this module
adds training's paragraph packing, the rank split and resumable tokenisation.

The recipe (spec section 4): every document is tokenised on its own, BOS prepended, truncated
to ``context_size`` tokens (``concat_tokens=False``); special positions are dropped later, when
activations are gathered. The stream is resumable by document index, and split across
data-parallel ranks by document index (document i goes to rank i % world).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llamascope_sdk import corpus
from llamascope_sdk.base.errors import DataUnavailableError

__all__ = ["PACK_CHARS", "TokenSource", "local_documents"]

#: Local text files without headings are split on blank lines, then consecutive paragraphs are
#: packed until a document reaches about this many characters (~ a 1024-token context).
PACK_CHARS = 4000


def local_documents(dataset: str, text_field: str = "text", holdout_fraction: float = 0.0,
                    heldout: bool = False) -> list[str]:
    """:func:`llamascope_sdk.corpus.local_documents` with training's paragraph packing
    (:data:`PACK_CHARS`): the documents the recipe trains on, or (``heldout=True``) the last
    ``holdout_fraction`` of each file."""
    return corpus.local_documents(dataset, text_field, holdout_fraction=holdout_fraction,
                                  heldout=heldout, pack_chars=PACK_CHARS)


class TokenSource:
    """Token rows [n, <=context] for one data-parallel rank, resumable by document index.

    Args:
        tokenizer: a transformers tokenizer.
        dataset: Hub name (streamed) or local file(s).
        rank, world: document i is used by rank ``i % world``.
        loop: restart from the first document when the stream ends (for small local corpora).
        holdout_fraction, heldout: local files only: the last ``holdout_fraction`` of each
            file's documents is held out; ``heldout=True`` reads only that part.
    """

    def __init__(self, tokenizer: Any, dataset: str, *, split: str = "train",
                 text_field: str = "text", context_size: int = 1024,
                 holdout_fraction: float = 0.0, rank: int = 0, world: int = 1,
                 loop: bool = True, split_long: bool = False, heldout: bool = False) -> None:
        self.tokenizer = tokenizer
        self.dataset, self.split, self.text_field = dataset, split, text_field
        self.context_size = context_size
        self.rank, self.world, self.loop = rank, world, loop
        self.split_long = split_long
        self.position = 0  # documents consumed (global index over all ranks)
        self._local = (corpus.LocalDocuments(dataset, text_field, holdout_fraction=holdout_fraction,
                                             heldout=heldout, pack_chars=PACK_CHARS)
                       if corpus.local_paths(dataset) is not None else None)
        if self._local is not None and not self._local:
            raise DataUnavailableError(f"{dataset} holds no documents")

    def _documents(self, start: int) -> Iterator[tuple[int, str]]:
        if self._local is not None:  # streamed again on every pass, from document start % n
            i, n = start, len(self._local)
            while self.loop or i < n:
                skip = i % n
                for j, text in enumerate(self._local):
                    if j < skip:
                        continue
                    if not self.loop and i >= n:
                        return
                    yield i, text
                    i += 1
            return
        for i, text in enumerate(corpus.hub_documents(self.dataset, self.split, self.text_field)):
            if i >= start:
                yield i, text

    def encode(self, text: str) -> list[tuple[int, list[int]]]:
        """(offset in the document's tokens, row) pairs: the corpus's ``"first"`` rule (BOS +
        the first context-1 tokens), or with ``split_long`` its ``"windows"`` rule (every
        (context-1)-token window, each with its own BOS); see :mod:`llamascope_sdk.corpus`."""
        rule: corpus.Rule = "windows" if self.split_long else "first"
        head = len(corpus.bos_ids(self.tokenizer))  # document token j sits at position j + 1
        return [(pos - 1 + head, row) for pos, row in
                corpus.split_document(self.tokenizer, text, self.context_size, rule=rule)]

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

