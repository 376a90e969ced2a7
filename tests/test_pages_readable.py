"""Issue 29.6 on constructed data: the histogram's axes carry numbers and names, byte tokens are
shown as text or <0x..> escapes (never the replacement character), and every label says where
it came from."""

from __future__ import annotations

import json
import re

import torch

from llamascope_sdk.store import view
from llamascope_sdk.store.explanations import label_text
from llamascope_sdk.store.feature_store import FeatureStore, readable_token
from llamascope_sdk.store.pages import feature_page, histogram_svg

from .conftest import CharTokenizer
from .test_feature_store import mined  # noqa: F401


class _ByteTokenizer:
    """decode() of a lone byte-level piece gives U+FFFD, as GPT-2-style tokenizers do."""

    pieces = {5: "Ġá¼", 6: "<0xE2>", 7: "ï¿½", 8: "Ġthe"}

    def decode(self, ids):
        return {5: " \ufffd", 6: "\ufffd", 7: "\ufffd", 8: " the"}[ids[0]]

    def convert_ids_to_tokens(self, i):
        return self.pieces[i]


def test_byte_tokens_are_readable_escapes_never_replacement_characters():
    tok = _ByteTokenizer()
    assert readable_token(tok, 5) == " <0xE1><0xBC>"  # byte-level BPE piece mapped to bytes
    assert readable_token(tok, 6) == "<0xE2>"         # SentencePiece byte fallback
    assert readable_token(tok, 7) == "<U+FFFD>"       # the character itself, named
    assert readable_token(tok, 8) == " the"


def test_histogram_axes_are_numbered_and_named():
    bins = [{"lo": 0.1 * 10 ** (k / 8), "hi": 0.1 * 10 ** ((k + 1) / 8), "count": c}
            for k, c in enumerate([3, 40, 700, 1200, 90, 5, 1, 2])]
    svg = histogram_svg(bins)
    yticks = re.findall(r'class="ytick"[^>]*>([\d,]+)<', svg)
    assert yticks == ["1", "10", "100", "1,000"]  # up to the largest count, 1,200
    xticks = re.findall(r'class="xtick"[^>]*>([^<]+)<', svg)
    assert xticks[0] == "0.1" and xticks[-1] == "0.1".replace("0.1", f"{bins[-1]['hi']:.3g}")
    assert len(xticks) >= 3
    assert "firings (log scale)" in svg and "activation (model units" in svg


def test_every_label_says_its_source(mined, tmp_path):  # noqa: F811
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    folder = store.save(tmp_path / "st")
    run = folder / "explanations" / "some-model" / "features"
    run.mkdir(parents=True)
    (run.parent / "config.json").write_text("{}")
    rec = {"feature": 2, "explanation": "vowels", "model": "some-model", "prompt_version": "1",
           "scores": {"detection": {"balanced_accuracy": 0.75}}}
    (run / "2.json").write_text(json.dumps(rec))
    store = FeatureStore.load(folder)
    store.labels = {1: "my own words", 2: label_text(rec)}
    assert view.label_source(store, 1) == "hand-written"
    assert view.label_source(store, 2) == "explainer some-model (detection 0.75)"
    assert view.label_source(store, 3) is None
    page = feature_page(store, 2)
    assert '(label: explainer some-model (detection 0.75))' in page
    assert "\ufffd" not in page and torch.is_tensor(store.top.values)
