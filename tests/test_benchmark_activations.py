"""The activation cache: the right activations, captured once per hook point, resumed from
disk, a second hook point added without recomputing the first, and the size formula."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.benchmark.activations import ActivationCache, cache_bytes
from llamascope_sdk.core.sites import Site
from tests.conftest import CharTokenizer

PROMPTS = ["The cat sat.", "A much longer prompt about the sea and its ships.", "Hi",
           "Twelve words here, more or less, to make a third length."]


def _direct(model: Any, tok: CharTokenizer, prompt: str, layer: int, from_end: int) -> torch.Tensor:
    """hidden_states[layer + 1] (the residual after ``layer``) of one unpadded prompt."""
    ids = torch.tensor([[tok.bos_token_id, *tok(prompt)["input_ids"]]])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    return h[0, ids.shape[1] - 1 - from_end]


def test_last_token_activations_match_a_plain_forward(tmp_path: Path, tiny_llama: Any) -> None:
    tok = CharTokenizer()
    cache = ActivationCache(tmp_path, tiny_llama, tok, max_len=64, batch_tokens=64)
    got = cache.get("set", PROMPTS, [Site(1, "resid_post")], from_end=2)[Site(1, "resid_post")]
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(got[i], _direct(tiny_llama, tok, p, 1, 2), rtol=1e-4,
                                   atol=1e-5)


def test_captured_once_then_read_back(tmp_path: Path, tiny_llama: Any) -> None:
    tok = CharTokenizer()
    a, b = Site(0, "resid_post"), Site(2, "resid_post")
    first = ActivationCache(tmp_path, tiny_llama, tok, max_len=64)
    x = first.get("set", PROMPTS, [a])[a]
    assert first.timing.forwards >= 1 and first.timing.computed_sets == 1
    again = ActivationCache(tmp_path, tiny_llama, tok, max_len=64)  # a new run, same folder
    y = again.get("set", PROMPTS, [a])[a]
    assert again.timing.forwards == 0 and again.timing.loaded_sets == 1
    assert torch.equal(x, y)
    before = first.path(a, "set").stat().st_mtime_ns
    both = again.get("set", PROMPTS, [a, b])  # only b is captured
    assert again.timing.forwards >= 1 and first.path(a, "set").stat().st_mtime_ns == before
    assert torch.equal(both[a], x) and both[b].shape == x.shape


def test_long_prompts_keep_their_end(tmp_path: Path, tiny_llama: Any) -> None:
    tok = CharTokenizer()
    cache = ActivationCache(tmp_path, tiny_llama, tok, max_len=8)
    ids = cache.ids(["abcdefghijklmnop"])[0]
    assert ids[0] == tok.bos_token_id and len(ids) == 8
    assert ids[1:] == tok("jklmnop")["input_ids"]


def test_size_formula() -> None:
    assert cache_bytes(334_092, 576, 1) == 4 * 576 * 334_092  # 0.77 GB
    assert cache_bytes(334_092, 4096, 2) == 2 * 4 * 4096 * 334_092
