"""Issue 29.1 and 29.2: which concept eval-steer measures (and that every result names it and
its source), and a sweep where only the no-op passes the limits chooses and exports nothing."""

from __future__ import annotations

import json

import pytest

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.cli.eval_steer import _exports
from llamascope_sdk.evaluation.concept import feature_concept, raising_tokens
from llamascope_sdk.evaluation.steer_eval import eval_steer

from .test_eval_steer import LAYER, _Tok, tiny_sae


class _Store:
    """The three things a concept is read from: explanation records (under ``path``),
    labels, and top examples (tokens with the feature's activation on each)."""

    def __init__(self, path, examples, labels=None):
        self.path, self._examples, self.labels = path, examples, labels or {}

    def examples(self, i):
        return self._examples.get(i, [])


def _example(tokens, acts):
    return {"tokens": tokens, "acts": acts}


EXAMPLES = {7: [_example([" the", " thou", " art", " so"], [0.0, 5.0, 2.0, 0.0]),
                _example([" of", " thy", " thou", "\n"], [0.5, 4.0, 3.0, 9.0]),
                _example([" hath", " a"], [1.0, 0.0])]}


def _explain(folder, i, text, scores):
    run = folder / "explanations" / "some-model"
    (run / "features").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    rec = {"feature": i, "explanation": text, "model": "some-model",
           "scores": {k: {"balanced_accuracy": v} for k, v in scores.items()}}
    (run / "features" / f"{i}.json").write_text(json.dumps(rec))


def test_top_example_tokens_are_summed_activation_per_token():
    store = _Store(None, EXAMPLES)
    # thou 5 + 3 = 8, thy 4, art 2, hath 1, of 0.5; the newline (blank) is skipped
    assert raising_tokens(store, 7, 5) == ["thou", "thy", "art", "hath", "of"]


def test_concept_comes_from_given_then_explanation_then_label_then_top_examples(tmp_path):
    lens = [" stock", " market", " thou", " thy"] + [f" w{k}" for k in range(6)]
    store = _Store(tmp_path, EXAMPLES)
    c = feature_concept(7, concept=None, labels={}, store=store, lens_words=lens)
    assert (c.text, c.source) == ("thou thy art hath of", "top-example tokens")
    assert c.lens_consistent is True and c.lens_shared == ("thou", "thy")
    c = feature_concept(7, concept=None, labels={7: "Early Modern English"}, store=store,
                        lens_words=lens)
    assert (c.text, c.source, c.detail) == ("Early Modern English", "label", "hand-written")
    _explain(tmp_path, 7, "archaic second-person pronouns", {"detection": 0.81, "fuzzing": 0.7})
    c = feature_concept(7, concept=None, labels={7: "Early Modern English"}, store=store,
                        lens_words=lens)
    assert (c.text, c.source) == ("archaic second-person pronouns", "explanation")
    assert c.detail == "by some-model, detection 0.81, fuzzing 0.70"
    c = feature_concept(7, concept="the sea", labels={7: "x"}, store=store, lens_words=lens)
    assert (c.text, c.source) == ("the sea", "given")


def test_the_logit_lens_alone_is_never_the_concept():
    # Feature 7's lens names nothing its examples show (issue 29: "||( uncertainties riment"):
    # inconsistent, and without a store, label or explanation there is no concept at all.
    lens = ["||(", " uncertainties", "riment"] + [f" w{k}" for k in range(7)]
    c = feature_concept(7, concept=None, labels={}, store=_Store(None, EXAMPLES), lens_words=lens)
    assert c.source == "top-example tokens" and c.lens_consistent is False
    with pytest.raises(InputError, match="feature 7 has no concept to measure"):
        feature_concept(7, concept=None, labels={}, store=None, lens_words=lens)


def test_results_name_the_concept_and_a_sweep_of_only_the_no_op_exports_nothing(
        tiny_llama, tmp_path):
    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    sae.labels = {5: "letters"}
    # a strength of 1e4 wrecks the text: only strength 0 (the no-op) passes a fluency limit of 1
    (r,) = eval_steer(tiny_llama, _Tok(), sae, [5], strengths=[0, 1e4], fluency_limit=1.0,
                      prompts=["abc de", "hello", "xyz w", "good mor"], max_new_tokens=4,
                      progress=False, baselines=False)
    d = r.to_dict()
    assert d["concept"] == "letters" and d["concept_source"]["source"] == "label"
    assert "rule" in d["concept_source"] and d["headline"] == "concept_lift"
    assert d["chosen"] == {} and d["no_choice"]["feature"].startswith(
        "feature 5, feature: no strength passed the limits (perplexity <= 1x")
    assert "\n" not in d["no_choice"]["feature"]
    out = _exports(sae, r, "add", tmp_path / "steer.pt", tmp_path / "req.json", "tiny")
    assert out == {} and not (tmp_path / "steer.pt").exists() and not (tmp_path / "req.json").exists()


def test_with_a_judge_its_score_chooses_the_strength_and_heads_the_table(tiny_llama, capsys,
                                                                         monkeypatch):
    """Issue 29.1: with a judge endpoint the AxBench score is the headline: it chooses the
    strength (not the concept lift) and is the first score column of the table."""
    from llamascope_sdk.cli.eval_steer import _print_feature

    sae = tiny_sae(layer=LAYER, d_sae=64, threshold=0.0)
    sae.labels = {5: "letters"}
    asked: list[tuple[str, str, str]] = []

    def judge(items):  # a scripted judge: the fewer distinct characters, the better (0..2)
        asked.extend(items)
        return [max(0.0, 2.0 - len(set(c)) / 4) for _, c, _ in items]

    (r,) = eval_steer(tiny_llama, _Tok(), sae, [5], strengths=[0, 2, 8, 32], fluency_limit=1e9,
                      diversity_limit=0.0, prompts=["abc de", "hello", "xyz w", "good mor"],
                      max_new_tokens=4, progress=False, baselines=False, judge=judge)
    assert asked and {c for _, _, c in asked} == {"letters"}
    d = r.to_dict()
    assert d["headline"] == "judge" and d["concept"] == "letters"
    sel = r.chosen_on["feature"]  # selection half; every strength eligible (no limits)
    assert all(p.judge is not None and 0 <= p.judge <= 2 for p in sel)
    best = max(range(len(sel)), key=lambda j: sel[j].judge)  # the first of the best
    assert sel[best].strength != 0 and r.chosen["feature"].strength == sel[best].strength
    # the concept lift alone would have chosen another strength (here: none beats no edit)
    assert max(range(len(sel)), key=lambda j: sel[j].concept_lift) != best
    monkeypatch.setenv("COLUMNS", "300")
    _print_feature("tiny", "add", r)
    out = capsys.readouterr().out
    assert "chosen on the other half by the AxBench judge score" in " ".join(out.split())
    header = [c.strip() for c in next(x for x in out.splitlines() if "method" in x).split("┃")]
    assert header[1:5] == ["method", "strength", "judge (0-2)", "concept lift"]
