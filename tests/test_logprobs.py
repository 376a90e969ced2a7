"""Log-probabilities from the batch generator equal a direct forward with the same edits.

Steered and unsteered rows, prompt scoring (echo) and generated tokens, in one batch of a tiny
random Llama in fp32: every value equals the log_softmax of a plain forward under attach() (the
prompt) and of model.generate's own logits under attach() (the generated tokens), to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk import Clamp, Steer, attach
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.steering.batch_generation import BatchGenerator, Row
from llamascope_sdk.steering.logprobs import FinalHidden, final_norm, score
from tests.helpers import tiny_sae

SPECIAL = [0, 1, 2]
TOL = 1e-5


def _reference(model, ids: list[int], ivs, n: int, top: int):
    """(prompt log-probs [None, ...], generated ids, their log-probs, top lists) of one row
    run alone: a forward of the prompt, then model.generate's logits, both under attach."""
    x = torch.tensor([ids])
    with attach(model, interventions=ivs, special_ids=SPECIAL, capture=False), torch.no_grad():
        lp_TV = torch.log_softmax(model(x).logits[0].float(), -1)
        prompt = [None] + [lp_TV[t - 1, ids[t]].item() for t in range(1, len(ids))]
        if n == 0:
            return prompt, [], [], []
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    new = out.sequences[0, len(ids):].tolist()
    steps = [torch.log_softmax(lg[0].float(), -1) for lg in out.logits]
    lps = [s[t].item() for s, t in zip(steps, new, strict=True)]
    tops = [s.topk(top).indices.tolist() for s in steps]
    return prompt, new, lps, tops


def test_logprobs_of_steered_and_unsteered_rows_in_one_batch_equal_direct_forwards(tiny_llama) -> None:
    sae_a, sae_b = tiny_sae(layer=0, seed=1), tiny_sae(layer=2, seed=2)
    rows = [([1, 5, 9, 13, 40], [Steer(sae_a, [3, 7], 4.0)], 4),
            ([1, 7, 8], [], 4),
            ([1, 60, 61, 62, 63, 64], [Clamp(sae_b, [5], 2.5, positions="generated")], 3),
            ([30, 31, 32, 33], [Steer(sae_b, [9], -3.0, positions="prompt")], 0),
            ([1, 50, 51], [], 0)]
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    handles = [gen.add(Row(p, e, max_new_tokens=n, stop_ids=[], logprobs=3, prompt_logprobs=True))
               for p, e, n in rows]
    events: dict[int, list] = {h: [] for h in handles}
    while gen.busy:
        for t in gen.step():
            events[t.row].append(t)
    moved = 0
    for (ids, ivs, n), h in zip(rows, handles, strict=True):
        prompt, new, lps, tops = _reference(tiny_llama, ids, ivs, n, 3)
        got = events[h]
        assert got[0].prompt is not None and got[0].prompt.token[0] is None
        assert got[0].prompt.top[0] == []
        assert got[0].prompt.token[1:] == pytest.approx(prompt[1:], abs=TOL, rel=0)
        if n == 0:
            assert [(t.token, t.finish) for t in got] == [(None, "length")]
            continue
        assert [t.token for t in got] == new
        assert [t.logprob for t in got] == pytest.approx(lps, abs=TOL, rel=0)
        for t, want_top in zip(got, tops, strict=True):
            assert [i for i, _ in t.top] == want_top
            if t.token == t.top[0][0]:  # greedy: the token's value IS the first alternative's
                assert t.logprob == t.top[0][1]
        plain, *_ = _reference(tiny_llama, ids, [], 0, 3)
        moved += max(abs(a - b) for a, b in zip(prompt[1:], plain[1:], strict=True)) > 1e-3
    assert moved >= 1  # the prompt-position edits really changed some prompt log-probs


def test_prompt_scoring_needs_no_generation_and_bad_values_are_refused(tiny_llama) -> None:
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    with pytest.raises(InputError, match="max_new_tokens"):
        gen.add(Row([1, 5], max_new_tokens=0))
    with pytest.raises(InputError, match="logprobs"):
        gen.add(Row([1, 5], logprobs=21))
    h = gen.add(Row([7], max_new_tokens=0, prompt_logprobs=True, logprobs=2))
    (t,) = gen.step()
    assert t.row == h and t.token is None and t.prompt is not None
    assert t.prompt.token == [None] and t.prompt.top == [[]]
    assert not gen.busy


def test_rows_done_at_prefill_leave_the_running_batch_untouched(tiny_llama) -> None:
    """A loglikelihood row (max_new_tokens 1) joining a running batch never enters its cache:
    the running row's tokens are those it gets alone."""
    alone = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    alone.add(Row([1, 5, 9], max_new_tokens=6, stop_ids=[]))
    want = []
    while alone.busy:
        want += [t.token for t in alone.step()]
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    h = gen.add(Row([1, 5, 9], max_new_tokens=6, stop_ids=[]))
    got = [t.token for t in gen.step() if t.row == h]
    for k in range(3):
        gen.add(Row([1] + list(range(10, 30 + k)), max_new_tokens=1, prompt_logprobs=True,
                    logprobs=1))
        got += [t.token for t in gen.step() if t.row == h]
        assert gen.size == 1  # the scored rows left at once
    while gen.busy:
        got += [t.token for t in gen.step() if t.row == h]
    assert got == want


def test_score_and_final_hidden(tiny_llama) -> None:
    logits = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, -1.0]])
    got = score(logits, torch.tensor([1, 0]), 2)
    want = torch.log_softmax(logits, -1)
    assert got.token == pytest.approx([want[0, 1].item(), want[1, 0].item()], abs=1e-7)
    assert [i for i, _ in got.top[0]] == [2, 1]
    assert final_norm(tiny_llama) is tiny_llama.model.norm
    x = torch.tensor([[1, 4, 5]])
    with FinalHidden(tiny_llama) as fh, torch.no_grad():
        logits_full = tiny_llama(x).logits
    assert fh.hidden_BTD is not None and not tiny_llama.model.norm._forward_hooks
    torch.testing.assert_close(tiny_llama.lm_head(fh.hidden_BTD), logits_full)


def test_score_in_chunks_gives_the_whole_tensors_values_bit_for_bit() -> None:
    from llamascope_sdk.steering import logprobs

    torch.manual_seed(3)
    n = 2 * logprobs.SCORE_CHUNK + 5  # two whole chunks and a short one
    logits, nxt = torch.randn(n, 300) * 4, torch.randint(0, 300, (n,))
    lp = torch.log_softmax(logits, -1)  # scored whole, as before chunks
    vals, idx = lp.topk(3, dim=-1)
    got = score(logits, nxt, 3)
    assert got.token == lp.gather(-1, nxt[:, None])[:, 0].tolist()
    assert got.top == [list(zip(i, v, strict=True))
                       for i, v in zip(idx.tolist(), vals.tolist(), strict=True)]
    assert score(logits, nxt, 0).top == [[]] * n
