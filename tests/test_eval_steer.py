"""eval-steer: the LLM-free metrics against plain per-row computations (hidden states, no hooks),
the held-out strength choice, and the lm-eval / serve exports."""

from __future__ import annotations

import math

import pytest
import torch

from llamascope_sdk import Steer, attach
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.evaluation.steer_eval import eval_steer
from llamascope_sdk.evaluation.steer_metrics import (
    diffmean_direction,
    score_continuations,
    side_effects,
)
from llamascope_sdk.loading.models import tokenize
from llamascope_sdk.steering.interventions import Clamp, Scale
from llamascope_sdk.steering.lm_eval_export import (
    lm_eval_hookpoint,
    lm_eval_steer_config,
    save_lm_eval_steer,
    save_serve_request,
    serve_request,
)
from tests.conftest import CharTokenizer
from tests.helpers import tiny_sae

LAYER = 1


class _Tok(CharTokenizer):
    """CharTokenizer whose decode takes the keywords generation passes."""

    def decode(self, ids, **_kwargs):
        return super().decode(ids)


def _hidden(model, ids):
    """Residual stream after decoder layer LAYER, and the log-probs, without hooks."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    return out.hidden_states[LAYER + 1], torch.log_softmax(out.logits.double(), -1)


def test_continuation_scores_match_plain_computation(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    prompts = [tokenize(char_tokenizer, p)[0].tolist() for p in ("abc", "hello wo", "xy")]
    conts = [[10, 11, 12, 13], [20, 21, 2], []]  # the second ends with EOS (dropped)
    lens, concept = [5, 6, 7], [30, 31]
    got = score_continuations(tiny_llama, char_tokenizer, sae, 3, prompts, conts, lens, concept)
    for p, c, g in zip(prompts, conts, got, strict=True):
        c = [t for t in c if t != 2]
        if not c:
            assert g.n_tokens == 0 and math.isnan(g.nll)
            continue
        ids = torch.tensor([p + c + concept])
        h, lp = _hidden(tiny_llama, ids)
        n_p, n_c = len(p), len(c)
        nll = -sum(lp[0, n_p + j - 1, c[j]].item() for j in range(n_c)) / n_c
        lens_lp = sum(torch.logsumexp(lp[0, n_p + j, lens], 0).item() for j in range(n_c)) / n_c
        act = sae.encode(h[0, n_p:n_p + n_c])[:, 3].mean().item()
        con = sum(lp[0, n_p + n_c + j - 1, concept[j]].item() for j in range(2)) / 2
        assert g.nll == pytest.approx(nll, abs=1e-4)
        assert g.lens_logprob == pytest.approx(lens_lp, abs=1e-4)
        assert g.concept_activation == pytest.approx(act, rel=1e-4, abs=1e-6)
        assert g.concept_logprob == pytest.approx(con, abs=1e-4)
        assert g.n_tokens == n_c
        pairs = [(c[j], c[j + 1]) for j in range(n_c - 1)]
        if pairs:
            assert g.distinct == len(set(pairs)) / len(pairs)


def test_side_effects_match_attach_per_text(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    texts = ["the cat sat on the mat", "a b"]
    edits = [[Steer(sae, [4], 3.0)], [Steer(sae, [9], -2.0), Steer(sae, [4], 1.0)]]
    got = side_effects(tiny_llama, char_tokenizer, texts, edits)
    for e, (kl, dl) in zip(edits, got, strict=True):
        kls, dls = [], []
        for t in texts:
            ids = tokenize(char_tokenizer, t)
            with torch.no_grad():
                clean = torch.log_softmax(tiny_llama(ids).logits.double(), -1)[0]
                with attach(tiny_llama, interventions=e, capture=False):
                    edited = torch.log_softmax(tiny_llama(ids).logits.double(), -1)[0]
            kls.append((clean.exp() * (clean - edited)).sum(-1).mean().item())
            tgt = ids[0, 1:, None]
            dls.append(-edited[:-1].gather(1, tgt).mean().item()
                       + clean[:-1].gather(1, tgt).mean().item())
        assert kl == pytest.approx(sum(kls) / 2, rel=1e-3, abs=1e-6)
        assert dl == pytest.approx(sum(dls) / 2, rel=1e-3, abs=1e-6)
        assert kl > 0


def test_diffmean_is_difference_of_means(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    pos, neg = ["thou art", "thy rose"], ["the stock market"]
    v = diffmean_direction(tiny_llama, char_tokenizer, sae, pos, neg)

    def mean(texts):
        rows = [_hidden(tiny_llama, tokenize(char_tokenizer, t))[0][0, 1:] for t in texts]
        return torch.cat(rows).mean(0)  # BOS (position 0) excluded

    torch.testing.assert_close(v, mean(pos) - mean(neg), rtol=1e-4, atol=1e-5)


def test_strength_is_chosen_on_the_selection_half(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    prompts = ["abc de", "hello", "xyz w", "good mor", "one two", "ab"]
    res = eval_steer(tiny_llama, _Tok(), sae, [5], strengths=[0, 1, 4, 16],
                     prompts=prompts, max_new_tokens=5, progress=False, fluency_limit=3.0)
    r = res[0]
    assert set(r.curves) == {"feature", "diffmean", "prompt", "none"}
    for m in ("feature", "diffmean"):
        sel, test = r.chosen_on[m], r.curves[m]
        assert [p.strength for p in test] == [0, 1, 4, 16]
        ref = sel[0].perplexity  # strength 0 adds nothing: the unsteered run
        ref_d = sel[0].distinct
        ok = [j for j, p in enumerate(sel) if p.perplexity <= 3.0 * ref
              and p.distinct >= 0.5 * ref_d]
        best = max(ok, key=lambda j: sel[j].concept_lift)
        assert r.chosen[m] is test[best]
        assert test[0].concept_lift == 0 and test[0].kl == 0
        assert test[0].perplexity == pytest.approx(r.curves["none"][0].perplexity)
    assert any(a.perplexity != b.perplexity for a, b in zip(r.chosen_on["feature"],
                                                            r.curves["feature"], strict=True))
    assert r.to_dict()["chosen"]["prompt"]["strength"] is None
    with pytest.raises(InputError, match="at least 2"):
        eval_steer(tiny_llama, char_tokenizer, sae, [5], prompts=["one"], progress=False)
    with pytest.raises(InputError, match="mode"):
        eval_steer(tiny_llama, char_tokenizer, sae, [5], mode="boost", progress=False)


def test_lm_eval_export_adds_what_steer_adds(tiny_llama, char_tokenizer, tmp_path):
    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    edit = Steer(sae, [3, 7], [2.0, -1.5])
    cfg = lm_eval_steer_config([edit])
    assert list(cfg) == ["layers.1"] == [lm_eval_hookpoint(sae.hyperparams.hook_point_out)]
    entry = cfg["layers.1"]
    assert entry["action"] == "add" and entry["bias"] is None
    want = 2.0 * sae.W_dec[3] - 1.5 * sae.W_dec[7]
    torch.testing.assert_close(entry["steering_coefficient"] * entry["steering_vector"], want)
    # lm-eval's add, as its hf_steered.py does it: coefficient x vector at every position of
    # the module's output (no BOS here, where both agree)
    ids = torch.tensor([[char_tokenizer("steer me")["input_ids"]][0]])
    module = tiny_llama.base_model.get_submodule("layers.1")

    def add(_m, _a, out):
        return (out[0] + entry["steering_coefficient"] * entry["steering_vector"], *out[1:]) \
            if isinstance(out, tuple) else out + entry["steering_coefficient"] * entry["steering_vector"]

    handle = module.register_forward_hook(add)
    try:
        with torch.no_grad():
            theirs = tiny_llama(ids).logits
    finally:
        handle.remove()
    with torch.no_grad(), attach(tiny_llama, interventions=[edit], capture=False):
        ours = tiny_llama(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    path = save_lm_eval_steer([edit], tmp_path / "steer.pt")
    assert path.stat().st_size > 0
    with pytest.raises(InputError, match="exists"):
        save_lm_eval_steer([edit], path)
    for bad in (Clamp(sae, [3], 1.0), Scale(sae, [3], 2.0)):
        with pytest.raises(InputError, match="cannot be exported"):
            lm_eval_steer_config([bad])
    with pytest.raises(InputError, match="positions"):
        lm_eval_steer_config([Steer(sae, [3], 1.0, positions="generated")])
    other = tiny_sae(layer=2, d_sae=64)
    with pytest.raises(InputError, match="one hookpoint"):
        lm_eval_steer_config([edit, Steer(other, [1], 1.0)])


def test_serve_request_body(tmp_path):
    sae = tiny_sae(layer=LAYER, d_sae=64)
    body = serve_request(Steer(sae, [3], 40.0), sae_spec="demo", prompt="Hi", chat=False)
    assert body == {"max_tokens": 64, "return_baseline": True, "prompt": "Hi",
                    "steering": [{"sae": "demo", "feature": 3, "mode": "add", "value": 40.0,
                                  "relative": False, "positions": "all"}]}
    chat = serve_request(Clamp(sae, [3, 4], [1.0, 2.0], positions="generated"), sae_spec="demo")
    assert chat["messages"][0]["role"] == "user"
    assert chat["steering"][0] == {"sae": "demo", "feature": [3, 4], "mode": "clamp",
                                   "value": [1.0, 2.0], "positions": "generated"}
    p = save_serve_request(Steer(sae, [3], 4.0), tmp_path / "req.json", sae_spec="demo")
    with pytest.raises(InputError, match="exists"):
        save_serve_request(Steer(sae, [3], 4.0), p, sae_spec="demo")


def test_degenerate_repetition_is_not_chosen_even_at_low_perplexity():
    """A strength whose continuation repeats itself (" of of of ...") can have a perplexity
    below the unsteered one; distinct-2 keeps it from being chosen."""
    from llamascope_sdk.evaluation.steer_eval import Point, choose
    from llamascope_sdk.evaluation.steer_metrics import distinct_2

    assert distinct_2([7, 7, 7, 7, 7]) == 0.25  # one bigram, 4 times
    assert distinct_2([1, 2, 1, 2, 1, 2]) == 0.4
    assert distinct_2([1, 2, 3, 4]) == 1.0 and math.isnan(distinct_2([3]))
    ref = Point("none", None, 0.0, 0.0, 3.0, distinct=0.9)
    pts = [Point("feature", 0.0, 0.0, 0.0, 3.0, distinct=0.9),
           Point("feature", 40.0, 1.0, 0.6, 5.0, distinct=0.8),    # fluent, some lift
           Point("feature", 160.0, 0.3, 7.8, 3.7, distinct=0.05),  # degenerate, huge lift
           Point("feature", 80.0, 2.0, 2.0, 9.0, distinct=0.7)]    # too perplex
    assert choose(pts, ref) == 1
    assert choose(pts, ref, diversity_limit=0.0) == 2  # without the guard it would win
    assert choose(pts, ref, fluency_limit=3.5) == 3
    assert choose(pts[2:3] + pts[3:], ref) == 0  # none eligible: the first point


@pytest.mark.smollm
def test_chat_mode_scores_the_assistants_reply(smollm2):
    """--chat: prompts go through the chat template; the unsteered reply equals the model's
    own greedy reply to that user message, and the prompt baseline's instruction sits in the
    same user message."""
    from llamascope_sdk import SAE

    model, tok = smollm2
    sae = SAE.from_pretrained("demo")
    prompts = ["Describe a quiet morning.", "What makes a good breakfast?"]
    (r,) = eval_steer(model, tok, sae, [4154], strengths=[0, 40], prompts=prompts, chat=True,
                      max_new_tokens=6, progress=False, baselines=False)
    ids = tok.apply_chat_template([{"role": "user", "content": prompts[1]}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False)
    assert r.examples["none"] == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert r.examples["feature@40"] != r.examples["none"]


def test_chat_mode_needs_a_chat_template(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    with pytest.raises(InputError, match="chat template"):
        eval_steer(tiny_llama, char_tokenizer, sae, [5], chat=True, progress=False)
