"""Conditional edits in the library: an edit with ``when=`` applies only where its condition
holds, in attach/generate, in the batched generator, and latched; against a reference loop
written here that recomputes the whole sequence at every step (no KV cache) with plain
PyTorch forward hooks and checks the condition position by position."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk import Clamp, Steer
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.sites import parse_hook_point
from llamascope_sdk.steering.attachment import attach
from llamascope_sdk.steering.batch_generation import generate_batch
from llamascope_sdk.steering.conditions import DirectionCondition, FeatureCondition
from llamascope_sdk.steering.row_edits import VectorEdit
from tests.helpers import tiny_sae

SPECIAL = (0, 1, 2)  # pad, bos, eos of tiny_llama


def _layer_out(model, layer: int):
    return model.model.layers[layer]


def _reference(model, ids: list[int], n_new: int, steps: list[dict]) -> list[int]:
    """Greedy continuation of ``ids`` where each entry of ``steps`` adds ``vector`` at the
    output of layer ``edit_layer`` at the positions where ``cond(acts)`` holds, ``acts`` being
    the output of layer ``cond_layer`` (clean of this edit: it is read before it), BOS and other
    special tokens excluded, latched if asked. The whole sequence runs at every step."""
    seq = list(ids)
    reads: dict[int, torch.Tensor] = {}
    for _ in range(n_new):
        reads.clear()
        handles = []

        def keep(layer):
            def hook(_m, _a, out):
                h = out[0] if isinstance(out, tuple) else out
                reads[layer] = h.detach().clone()
            return hook

        def edit(entries):
            def hook(_m, _a, out):
                h = out[0] if isinstance(out, tuple) else out
                h = h.clone()
                for e in entries:
                    x = reads[e["cond_layer"]][0]  # [T, D]
                    on = False
                    for t in range(h.shape[1]):
                        fires = bool(e["cond"](x[t])) and seq[t] not in SPECIAL
                        on = (on or fires) if e.get("latch") else fires
                        if on and seq[t] not in SPECIAL:
                            h[0, t] = h[0, t] + e["vector"].to(h.dtype)
                return (h, *out[1:]) if isinstance(out, tuple) else h
            return hook

        for layer in sorted({e["cond_layer"] for e in steps}):
            handles.append(_layer_out(model, layer).register_forward_hook(keep(layer)))
        for layer in sorted({e["edit_layer"] for e in steps}):
            handles.append(_layer_out(model, layer).register_forward_hook(
                edit([e for e in steps if e["edit_layer"] == layer])))
        try:
            with torch.no_grad():
                logits = model(torch.tensor([seq]), use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def saes():
    return tiny_sae(layer=0, seed=1), tiny_sae(layer=1, seed=2)


def _threshold(model, sae, feature: int, ids: list[int]) -> float:
    """The median activation of ``feature`` on ``ids`` unsteered: the condition fires at
    about half of the positions."""
    with attach(model, [sae]) as h, torch.no_grad():
        model(torch.tensor([ids]), use_cache=False)
    v = h.features[sae.name][0, :, feature]
    return _between(v[v > 0]) if bool((v > 0).any()) else 0.0


def _between(v: torch.Tensor) -> float:
    """A threshold halfway between two neighbouring values around the median, so no value
    sits on it (a reading equal to the threshold would be decided by float rounding)."""
    s = v.flatten().sort().values
    if s.numel() < 2:
        return float(s[0]) / 2
    i = s.numel() // 2
    return float(s[i - 1] + s[i]) / 2


PROMPTS = [[1, 5, 9, 14, 22, 31, 40], [1, 60, 61, 62], [1, 7, 7, 7, 7, 7, 8, 9], [1, 90, 3, 44, 45]]


def _feature(model, sae0) -> int:
    with attach(model, [sae0]) as h, torch.no_grad():
        model(torch.tensor([PROMPTS[0]]), use_cache=False)
    fired = (h.features[sae0.name][0] > 0).float().mean(0)
    return int(((fired - 0.5).abs()).argmin())  # fires at about half the positions


def test_conditional_steer_in_generate_equals_the_reference_loop(tiny_llama, saes) -> None:
    model = tiny_llama
    sae0, sae1 = saes
    f = _feature(model, sae0)
    above = _threshold(model, sae0, f, PROMPTS[0])
    for latch in (False, True):
        when = FeatureCondition(sae0, f, above, latch=latch)
        iv = Steer(sae1, [3, 4], [6.0, -4.0], when=when)
        vector = (iv.coefficients() @ sae1.W_dec[iv.idx]).detach()
        ids = torch.tensor([PROMPTS[0]])
        with attach(model, interventions=[iv], capture=False, special_ids=SPECIAL), torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                 do_sample=False, pad_token_id=0)
        want = _reference(model, PROMPTS[0], 8, [{
            "cond_layer": 0, "edit_layer": 1, "vector": vector, "latch": latch,
            "cond": lambda x, w=when: float(sae0.encode(x[None])[0, f]) > above}])
        assert out[0, len(PROMPTS[0]):].tolist() == want
        if not latch:  # the condition decided: neither the unsteered nor the always-on tokens
            plain = _reference(model, PROMPTS[0], 8, [])
            always = _reference(model, PROMPTS[0], 8, [{
                "cond_layer": 0, "edit_layer": 1, "vector": vector, "cond": lambda x: True}])
            assert want not in (plain, always)


def test_eight_mixed_rows_in_one_batch_equal_the_reference_loop(tiny_llama, saes) -> None:
    model = tiny_llama
    sae0, sae1 = saes
    f = _feature(model, sae0)
    above = _threshold(model, sae0, f, PROMPTS[0])
    v = torch.randn(64)
    rows, refs = [], []
    for i in range(8):
        p = PROMPTS[i % len(PROMPTS)]
        kind = i % 4
        if kind == 0:  # feature condition, not latched
            when = FeatureCondition(sae0, f, above)
            iv = Steer(sae1, [5], 8.0, when=when)
            cond = (lambda x: float(sae0.encode(x[None])[0, f]) > above, 0, False)
        elif kind == 1:  # feature condition, latched
            when = FeatureCondition(sae0, f, above * 1.5, latch=True)
            iv = Steer(sae1, [6], -7.0, when=when)
            cond = (lambda x: float(sae0.encode(x[None])[0, f]) > above * 1.5, 0, True)
        elif kind == 2:  # direction condition at the edit's own site (read before the edit)
            when = DirectionCondition(v, "blocks.1.hook_resid_post", 0.0)
            iv = VectorEdit(3.0 * torch.ones(64), parse_hook_point("blocks.1.hook_resid_post"),
                            when=when)
            u = v / v.norm()
            cond = (lambda x, u=u: float(x.float() @ u) > 0.0, 1, False)
        else:  # no edit
            iv, cond = None, None
        rows.append(([iv] if iv is not None else [], p))
        if iv is None:
            refs.append(_reference(model, p, 6, []))
            continue
        vec = iv.vector if isinstance(iv, VectorEdit) else (iv.coefficients() @ sae1.W_dec[iv.idx])
        refs.append(_reference(model, p, 6, [{"cond_layer": cond[1], "edit_layer": 1,
                                              "vector": vec.detach(), "latch": cond[2],
                                              "cond": cond[0]}]))

    class Tok:
        all_special_ids = list(SPECIAL)
        eos_token_id, pad_token_id, bos_token_id = 2, 0, 1

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    gens = generate_batch(model, Tok(), [p for _, p in rows], [e for e, _ in rows],
                          max_new_tokens=6)
    assert [g.ids for g in gens] == refs
    # the conditions did decide something: at least one conditional row differs from plain
    plain = generate_batch(model, Tok(), [p for _, p in rows], None, max_new_tokens=6)
    always = generate_batch(model, Tok(), [p for _, p in rows],
                            [[Steer(sae1, [5], 8.0)] if i % 4 == 0 else [] for i in range(8)],
                            max_new_tokens=6)
    assert any(g.ids != q.ids for g, q in zip(gens, plain, strict=True))
    assert [g.ids for g in gens][0] != always[0].ids or gens[0].ids != plain[0].ids


def test_a_condition_read_after_the_edit_is_refused(saes) -> None:
    sae0, sae1 = saes
    with pytest.raises(InputError, match="read it at the edit's layer or an earlier one"):
        Steer(sae0, [1], 1.0, when=FeatureCondition(sae1, 2, 0.5))
    with pytest.raises(InputError, match="finite number"):
        FeatureCondition(sae0, 1, float("nan"))
    with pytest.raises(InputError, match="non-zero"):
        DirectionCondition(torch.zeros(64), "blocks.0.hook_resid_post", 1.0)


def test_clamp_with_a_condition_only_changes_where_it_holds(tiny_llama, saes) -> None:
    model = tiny_llama
    sae0, sae1 = saes
    f = _feature(model, sae0)
    above = _threshold(model, sae0, f, PROMPTS[0])
    ids = torch.tensor([PROMPTS[0]])
    with attach(model, [sae0]) as h, torch.no_grad():
        model(ids, use_cache=False)
    holds = (h.features[sae0.name][0, :, f] > above) & ~torch.isin(ids[0], torch.tensor(SPECIAL))
    assert bool(holds.any()) and not bool(holds.all())

    def resid_after_layer1(interventions):
        got = {}
        with attach(model, interventions=interventions, special_ids=SPECIAL, capture=False):
            hd = model.model.layers[1].register_forward_hook(
                lambda _m, _a, out: got.setdefault("h", (out[0] if isinstance(out, tuple) else out).clone()))
            try:
                with torch.no_grad():
                    model(ids, use_cache=False)
            finally:
                hd.remove()
        return got["h"][0]

    clean = resid_after_layer1([])
    edited = resid_after_layer1([Clamp(sae1, [7], 5.0, when=FeatureCondition(sae0, f, above))])
    changed = (edited - clean).abs().amax(-1) > 0
    assert changed.tolist() == holds.tolist()


def test_eval_steer_reports_where_the_condition_fired(tiny_llama, saes) -> None:
    """A condition that never holds leaves every prompt as it was (all quiet, all unchanged);
    one that always holds on real tokens fires on every prompt; the report's counts are
    checked against generations made here."""
    from llamascope_sdk.evaluation.steer_eval import eval_steer
    from tests.test_eval_steer import _Tok

    sae0, sae1 = saes
    tok = _Tok()
    prompts = ["abc def", "hello wo", "xyz", "the cat", "a b c", "more text"]
    f = _feature(tiny_llama, sae0)
    never = FeatureCondition(sae0, f, 1e6)
    res = eval_steer(tiny_llama, tok, sae1, [5], strengths=[0.0, 8.0], prompts=prompts, concept="abc",
                     max_new_tokens=4, baselines=False, progress=False, when=never)[0]
    rows = {r["strength"]: r for r in res.condition}
    assert rows[8.0] == {"strength": 8.0, "fired": 0.0, "quiet_prompts": 3,
                         "quiet_unchanged": 1.0, "quiet_dlog_perplexity": 0.0}
    sometimes = FeatureCondition(sae0, f, _threshold(tiny_llama, sae0, f, PROMPTS[0]))
    res = eval_steer(tiny_llama, tok, sae1, [5], strengths=[8.0], prompts=prompts, concept="abc",
                     max_new_tokens=4, baselines=False, progress=False, when=sometimes)[0]
    got = res.condition[0]
    gens = generate_batch(tiny_llama, tok, [prompts[i] for i in (1, 3, 5)],
                          [[Steer(sae1, [5], 8.0, when=sometimes)]] * 3, max_new_tokens=4)
    fired = [g.fired for g in gens]
    assert got["fired"] == pytest.approx(sum(fired) / 3)
    assert got["quiet_prompts"] == 3 - sum(fired)
