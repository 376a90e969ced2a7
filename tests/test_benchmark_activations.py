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


def test_each_distinct_row_runs_once(tmp_path: Path, tiny_llama: Any) -> None:
    """Rows repeated inside a set or held by another set are copied (bit-identical to the row
    they copy), only distinct rows reach the model, and every row still equals a plain
    unpadded forward of its prompt alone, also with short rows padded beside long ones."""
    tok = CharTokenizer()
    site = Site(1, "resid_post")
    first = ["The cat sat.", "Hi", "The cat sat.", PROMPTS[1]]  # one repeat inside the set
    second = ["Hi", "A new one.", PROMPTS[1], "A new one."]  # two rows of `first`, one repeat
    cache = ActivationCache(tmp_path, tiny_llama, tok, max_len=64, batch_tokens=512)
    a = cache.get("first", first, [site])[site]
    distinct_a = sum(len(r) for r in cache.ids(list(dict.fromkeys(first))))
    assert cache.timing.tokens == distinct_a and cache.timing.reused_rows == 1
    assert torch.equal(a[0], a[2])
    b = cache.get("second", second, [site])[site]
    assert cache.timing.tokens == distinct_a + len(cache.ids(["A new one."])[0])
    assert cache.timing.reused_rows == 1 + 3
    assert torch.equal(b[0], a[1]) and torch.equal(b[2], a[3]) and torch.equal(b[1], b[3])
    for got, prompts in ((a, first), (b, second)):
        for i, p in enumerate(prompts):
            torch.testing.assert_close(got[i], _direct(tiny_llama, tok, p, 1, 0), rtol=1e-4,
                                       atol=1e-5)
    # a later run in the same folder finds the rows through the keys stored on disk
    again = ActivationCache(tmp_path, tiny_llama, tok, max_len=64, batch_tokens=512)
    c = again.get("third", ["Hi", "The cat sat."], [site])[site]
    assert again.timing.forwards == 0 and again.timing.reused_rows == 2
    assert torch.equal(c[0], a[1]) and torch.equal(c[1], a[0])


def test_another_position_is_not_reused(tmp_path: Path, tiny_llama: Any) -> None:
    tok = CharTokenizer()
    site = Site(0, "resid_post")
    cache = ActivationCache(tmp_path, tiny_llama, tok, max_len=64)
    cache.get("last", PROMPTS, [site])
    before = cache.timing.tokens
    x = cache.get("before-end", PROMPTS, [site], from_end=1)[site]
    assert cache.timing.tokens == 2 * before and cache.timing.reused_rows == 0
    for i, p in enumerate(PROMPTS):
        torch.testing.assert_close(x[i], _direct(tiny_llama, tok, p, 0, 1), rtol=1e-4, atol=1e-5)


def test_a_set_captured_again_with_other_prompts(tmp_path: Path, tiny_llama: Any) -> None:
    """A set whose prompts changed is captured again; rows of its old version are not
    confused with the new one."""
    tok = CharTokenizer()
    site = Site(1, "resid_post")
    ActivationCache(tmp_path, tiny_llama, tok, max_len=64).get("set", PROMPTS[:2], [site])
    cache = ActivationCache(tmp_path, tiny_llama, tok, max_len=64)
    new = [PROMPTS[2], "Another.", PROMPTS[0]]
    x = cache.get("set", new, [site])[site]
    y = cache.get("other", [PROMPTS[0], "Another."], [site])[site]
    assert torch.equal(y[0], x[2]) and torch.equal(y[1], x[1])
    for i, p in enumerate(new):
        torch.testing.assert_close(x[i], _direct(tiny_llama, tok, p, 1, 0), rtol=1e-4, atol=1e-5)


def test_batches_bound_the_padding(tmp_path: Path, tiny_llama: Any) -> None:
    """Rows of many lengths: no batch pads a row by more than 10% of the batch's width, and
    every row still equals a plain forward of its prompt alone."""
    tok = CharTokenizer()
    prompts = ["x" * n for n in (3, 4, 5, 9, 10, 11, 20, 21, 22, 23, 40)]
    cache = ActivationCache(tmp_path, tiny_llama, tok, max_len=64, batch_tokens=4096)
    rows = cache.ids(prompts)
    for chunk in cache._batches(rows, list(range(len(rows)))):
        width = max(len(rows[i]) for i in chunk)
        assert all(width - len(rows[i]) <= 0.1 * width for i in chunk)
    x = cache.get("set", prompts, [Site(1, "resid_post")])[Site(1, "resid_post")]
    assert cache.timing.padded_tokens <= 1.1 * cache.timing.tokens
    for i, p in enumerate(prompts):
        torch.testing.assert_close(x[i], _direct(tiny_llama, tok, p, 1, 0), rtol=1e-4, atol=1e-5)
