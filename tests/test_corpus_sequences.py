"""corpus: documents -> sequences (the one BOS-and-cut rule, windows or first) -> batches.

The references below are written from the rules' wording (lists sliced by hand), not with the
corpus code."""

from __future__ import annotations

import random

import pytest
import torch

from llamascope_sdk import corpus
from llamascope_sdk.base.errors import InputError

from .conftest import CharTokenizer

TOK = CharTokenizer()
DOCS = ["abcdefghij", "", "xy", "0123456789" * 3, "q"]


def ids_of(text: str) -> list[int]:
    return TOK(text)["input_ids"]


def test_windows_read_every_token_with_one_bos_each_and_document_positions() -> None:
    counts = corpus.ReadCounts()
    got = list(corpus.sequences(TOK, DOCS, context=5, rule="windows", counts=counts))
    want = []
    for d, text in enumerate(DOCS):
        toks = ids_of(text)
        for j in range(0, len(toks), 4):  # context 5 = BOS + 4 document tokens
            want.append((d, j, [1, *toks[j:j + 4]]))
    assert [(s.doc, s.pos, s.ids) for s in got] == want
    # id c of a sequence sits at document position pos + c; token j of a document at j + 1.
    for s in got:
        toks = ids_of(DOCS[s.doc])
        assert all(toks[s.pos + c - 1] == s.ids[c] for c in range(1, len(s.ids)))
    n_text = sum(len(d) for d in DOCS)
    assert counts.as_dict() == {"documents": 5, "sequences": len(want), "tokens_read": n_text,
                                "tokens_available": n_text, "documents_cut": 0, "null_rows": 0,
                                "exhausted": True}


def test_first_rule_is_one_sequence_per_document_and_counts_what_it_cut() -> None:
    counts = corpus.ReadCounts()
    got = list(corpus.sequences(TOK, DOCS, context=5, rule="first", counts=counts))
    assert [(s.doc, s.pos, s.ids) for s in got] == [
        (d, 0, [1, *ids_of(t)[:4]]) for d, t in enumerate(DOCS) if t]
    assert counts.tokens_read == 4 + 2 + 4 + 1 and counts.documents_cut == 2
    assert counts.tokens_available == sum(len(d) for d in DOCS)


def test_budget_counts_bos_and_cuts_the_last_sequence() -> None:
    counts = corpus.ReadCounts()
    got = list(corpus.sequences(TOK, DOCS, context=5, tokens=12, rule="windows", counts=counts))
    # doc 0: [B abcd] [B efgh] then 2 ids left: [B i]
    assert [s.ids for s in got] == [[1, *ids_of("abcd")], [1, *ids_of("efgh")], [1, *ids_of("i")]]
    assert sum(len(s.ids) for s in got) == 12
    assert counts.tokens_read == 9 and counts.documents_cut == 1 and not counts.exhausted
    # A budget that ends exactly at the end of a document that has nothing more: not cut.
    counts = corpus.ReadCounts()
    list(corpus.sequences(TOK, ["abc", "de"], context=8, tokens=4, counts=counts))
    assert counts.documents_cut == 0 and counts.tokens_read == 3


def test_batches_sort_by_length_and_say_where_each_row_came_from() -> None:
    counts = corpus.ReadCounts()
    seqs = list(corpus.sequences(TOK, DOCS, context=5))
    orders = [sum(len(s.ids) for s in seqs[:i]) for i in range(len(seqs))]
    rows = []
    for b in corpus.batches(TOK, DOCS, tokens=None, context=5, batch_size=3, counts=counts):
        assert b.ids.shape[0] <= 3 and (b.lengths == b.valid.sum(1)).all()
        assert (b.ids[~b.valid] == corpus.pad_id(TOK)).all()
        for r in range(b.ids.shape[0]):
            rows.append((int(b.doc[r]), int(b.pos[r]), int(b.order[r]),
                         b.ids[r, :int(b.lengths[r])].tolist()))
    assert sorted(rows, key=lambda r: r[2]) == [
        (s.doc, s.pos, o, s.ids) for s, o in zip(seqs, orders, strict=True)]
    assert [len(r[3]) for r in rows] == sorted(len(s.ids) for s in seqs)  # one pool, sorted
    assert counts.sequences == len(seqs)


def test_token_batches_default_is_the_first_rule() -> None:
    rows = [ids[v].tolist() for ids, v in corpus.token_batches(TOK, DOCS, tokens=100, context=5,
                                                                batch_size=8)
            for ids, v in zip(ids, v, strict=True)]
    assert sorted(rows) == sorted([1, *ids_of(t)[:4]] for t in DOCS if t)


def test_bad_sizes_are_refused_with_the_value() -> None:
    with pytest.raises(InputError, match="context=1 is too small"):
        list(corpus.sequences(TOK, DOCS, context=1))
    with pytest.raises(InputError, match="tokens=0"):
        list(corpus.sequences(TOK, DOCS, context=4, tokens=0))
    with pytest.raises(InputError, match="batch_size=0"):
        list(corpus.batches(TOK, DOCS, tokens=10, context=4, batch_size=0))
    with pytest.raises(InputError, match="unknown rule 'all'"):
        list(corpus.sequences(TOK, DOCS, context=4, rule="all"))  # type: ignore[arg-type]


def test_long_documents_are_tokenised_in_pieces_with_the_same_ids(monkeypatch) -> None:
    """A document longer than PIECE_CHARS is tokenised in pieces cut at spaces; with a
    tokenizer whose tokens never cross a space the ids equal the whole document's."""
    calls: list[int] = []

    class WordTokenizer(CharTokenizer):
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
            calls.append(len(text))
            return super().__call__(text)

    monkeypatch.setattr(corpus.tokens, "PIECE_CHARS", 100)
    rng = random.Random(0)
    text = " ".join("".join(rng.choice("abc") for _ in range(rng.randint(1, 9))) for _ in range(200))
    tok = WordTokenizer()
    got = [i for _, ids in corpus.split_document(tok, text, None) for i in ids]
    assert got == [1, *ids_of(text)]
    assert max(calls) <= 100 and len(calls) >= len(text) // 100
    # Under the first rule only the pieces needed are tokenised.
    calls.clear()
    assert corpus.encode(tok, text, context=10) == [1, *ids_of(text)[:9]]
    assert sum(calls) <= 200


@pytest.mark.smollm
def test_pieces_give_the_whole_documents_ids_with_smollm2(smollm2, monkeypatch) -> None:
    """With SmolLM2's byte-level BPE, cutting at a space between two non-spaces gives exactly
    the ids of tokenising the whole text (prose, numbers, punctuation, newlines, unicode)."""
    _, tok = smollm2
    rng = random.Random(1)
    words = ["the", "King", "said", ",", ".", "1832", "3.14", "naïve", "—", "don't", "\n", "\n\n",
             "  ", "(see", "below)", "e-mail", "東京", "!!", "'s"]
    text = " ".join(rng.choice(words) for _ in range(20_000))
    whole = tok(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(corpus.tokens, "PIECE_CHARS", 1000)
    got = [i for ids in corpus.document_tokens(tok, corpus.tokens.pieces(text)) for i in ids]
    assert got == whole


def test_pad_rows_and_encode() -> None:
    assert corpus.pad_rows([[5, 6], [7]], 0).tolist() == [[5, 6], [7, 0]]
    assert corpus.encode(TOK, "abc") == [1, *ids_of("abc")]
    assert corpus.encode(TOK, "abc", bos=False) == ids_of("abc")
    assert corpus.encode(TOK, "") == [1]
    assert torch.equal(torch.tensor(corpus.encode(TOK, "abcdef", context=3)),
                       torch.tensor([1, *ids_of("ab")]))
