"""Batched generation with per-row edits equals each row run alone through attach + generate."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk import Ablate, Clamp, Scale, Steer, attach, compare_generations, hooked
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.steering.batch_generation import BatchGenerator, Row, generate_batch
from llamascope_sdk.steering.row_edits import VectorEdit, as_row_edits, row_hooks
from tests.helpers import tiny_sae

SPECIAL = [0, 1, 2]


def _alone(model, ids: list[int], ivs, n: int) -> list[int]:
    """Reference: one row, model.generate under attach (what compare_generations runs)."""
    x = torch.tensor([ids])
    with attach(model, interventions=ivs, special_ids=SPECIAL, capture=False):
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _edits(sae_a, sae_b):
    return [
        [Steer(sae_a, [3, 7], 4.0, positions="generated")],
        [],
        [Clamp(sae_b, [5], 2.5, positions="generated")],
        [Clamp(sae_a, [1, 2, 3], 5.0, positions="prompt"), Steer(sae_b, [9], -3.0)],
        [Ablate(sae_b, list(range(0, 256, 3)))],
        [Scale(sae_a, [11], 3.0), Clamp(sae_a, [4], 1.0, positions=slice(2, None))],
    ]


PROMPTS = [[1, 5, 9, 13, 40], [1, 7], [1, 60, 61, 62, 63, 64, 65, 66], [1, 30, 31],
           [1, 8, 8, 8, 8, 9], [1, 50, 51, 52, 53]]


def test_batch_equals_each_row_alone(tiny_llama) -> None:
    sae_a, sae_b = tiny_sae(layer=0, seed=1), tiny_sae(layer=2, seed=2)
    edits = _edits(sae_a, sae_b)
    want = [_alone(tiny_llama, p, e, 12) for p, e in zip(PROMPTS, edits, strict=True)]
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    handles = [gen.add(Row(p, e, max_new_tokens=12, stop_ids=[])) for p, e in zip(PROMPTS, edits, strict=True)]
    out: dict[int, list[int]] = {h: [] for h in handles}
    steps = 0
    while gen.busy and steps < 50:
        for t in gen.step():
            out[t.row].append(t.token)
        steps += 1
    got = [out[h] for h in handles]
    assert got == want
    # the edits did something: at least one edited row differs from its unedited run
    plain = [_alone(tiny_llama, p, [], 12) for p in PROMPTS]
    assert plain[1] == got[1]
    assert sum(g != p for g, p in zip(got, plain, strict=True)) >= 3


def test_rows_join_and_leave_midway(tiny_llama) -> None:
    """batch_size=2: rows join as others finish (cache merged, left-padded) with the same tokens."""
    sae_a, sae_b = tiny_sae(layer=0, seed=1), tiny_sae(layer=2, seed=2)
    edits = _edits(sae_a, sae_b)
    want = [_alone(tiny_llama, p, e, 4 + 3 * i) for i, (p, e) in enumerate(zip(PROMPTS, edits, strict=True))]
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    todo = list(enumerate(zip(PROMPTS, edits, strict=True)))
    out: dict[int, list[int]] = {}
    which: dict[int, int] = {}
    for _ in range(100):
        while todo and gen.size < 2:
            i, (p, e) = todo.pop(0)
            which[gen.add(Row(p, e, max_new_tokens=4 + 3 * i, stop_ids=[]))] = i
        if not gen.busy:
            break
        for t in gen.step():
            out.setdefault(which[t.row], []).append(t.token)
    assert [out[i] for i in range(len(PROMPTS))] == want


def test_cancel_frees_the_row_and_others_continue(tiny_llama) -> None:
    sae = tiny_sae(layer=1, seed=3)
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    a = gen.add(Row(PROMPTS[0], [Steer(sae, [1], 5.0)], max_new_tokens=10, stop_ids=[]))
    b = gen.add(Row(PROMPTS[2], [], max_new_tokens=10, stop_ids=[]))
    got: dict[int, list[int]] = {a: [], b: []}
    for t in gen.step() + gen.step():
        got[t.row].append(t.token)
    gen.cancel(a)
    while gen.busy:
        for t in gen.step():
            got[t.row].append(t.token)
    assert len(got[a]) == 2 and gen.size == 0
    assert got[b] == _alone(tiny_llama, PROMPTS[2], [], 10)


def test_rows_without_edits_are_bit_identical(tiny_llama) -> None:
    """Row hooks change only the rows that have edits: the others' logits are exactly those of
    the same batch without hooks."""
    sae = tiny_sae(layer=1, seed=4)
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12], [1, 13, 14, 15, 16]])
    pos = torch.arange(5)[None].expand(3, 5)
    keep = ids > 2
    edits = [as_row_edits(tiny_llama, e) for e in ([Clamp(sae, [2], 9.0)], [], [Steer(sae, [3], 7.0)])]
    with torch.no_grad():
        clean = tiny_llama(ids).logits
        with hooked(tiny_llama, row_hooks(edits, pos, [5, 5, 5], keep)):
            edited = tiny_llama(ids).logits
    assert torch.equal(edited[1], clean[1])
    assert not torch.allclose(edited[0], clean[0]) and not torch.allclose(edited[2], clean[2])


def test_vector_edit_equals_steer(tiny_llama) -> None:
    """A steer given as its vector (decoder rows only) is bit-identical to the Steer."""
    sae = tiny_sae(layer=1, seed=5)
    iv = Steer(sae, [4, 8], [2.0, -1.5], positions="generated")
    vec = iv.coefficients() @ sae.W_dec[iv.idx]
    from llamascope_sdk.core.sites import Site

    ve = VectorEdit(vec, Site(1, "resid_post"), positions="generated")
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    h1 = gen.add(Row(PROMPTS[0], [iv], max_new_tokens=8, stop_ids=[]))
    h2 = gen.add(Row(PROMPTS[0], [ve], max_new_tokens=8, stop_ids=[]))
    out: dict[int, list[int]] = {h1: [], h2: []}
    while gen.busy:
        for t in gen.step():
            out[t.row].append(t.token)
    assert out[h1] == out[h2] == _alone(tiny_llama, PROMPTS[0], [iv], 8)


def test_bad_rows_are_refused_before_generation(tiny_llama) -> None:
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    with pytest.raises(InputError, match="empty"):
        gen.add(Row([]))
    with pytest.raises(InputError, match="window"):
        gen.add(Row([1] * 100, max_new_tokens=40))
    with pytest.raises(InputError, match="temperature"):
        gen.add(Row([1, 5], temperature=float("nan")))
    with pytest.raises(InputError, match="top_p"):
        gen.add(Row([1, 5], top_p=0.0))
    assert not gen.busy


def test_sampling_is_reproducible_with_a_seed(tiny_llama) -> None:
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    hs = [gen.add(Row(PROMPTS[0], max_new_tokens=10, temperature=1.0, seed=s, stop_ids=[]))
          for s in (7, 7, 8)]
    out: dict[int, list[int]] = {h: [] for h in hs}
    while gen.busy:
        for t in gen.step():
            out[t.row].append(t.token)
    assert out[hs[0]] == out[hs[1]] != out[hs[2]]


@pytest.mark.smollm
@pytest.mark.slow
def test_smollm2_batch_equals_compare_generations(smollm2) -> None:
    """On the real model, fp32 greedy: a batch of mixed edits on two SAEs at different layers
    (one the demo SAE) gives exactly compare_generations' steered tokens for each row."""
    from llamascope_sdk import SAE
    from llamascope_sdk.loading import demo

    model, tok = smollm2
    sae15 = SAE.from_pretrained(demo.DEMO_SAE_DIR)
    sae5 = tiny_sae(layer=5, seed=6, d_model=576, d_sae=1024)
    prompts = ["My favourite thing about the city is", "Once upon a time", "The sea is", "Hi"]
    edits = [[Steer(sae15, [4154], 80.0)], [],
             [Clamp(sae5, [10], 8.0, positions="generated"), Scale(sae15, [1297], 4.0)],
             [Ablate(sae15, [4154, 1062]), Steer(sae5, [3], 20.0, positions="prompt")]]
    got = generate_batch(model, tok, prompts, edits, max_new_tokens=12)
    for p, e, g in zip(prompts, edits, got, strict=True):
        assert g.ids == compare_generations(model, tok, p, e, max_new_tokens=12).steered_ids
