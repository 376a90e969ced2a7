"""Does the steer work? A strength sweep per feature, against a prompt and a DiffMean baseline.

For each feature, every held-out prompt is continued greedily (all prompts and strengths of a
feature in one batch, :func:`~llamascope_sdk.steering.batch_generation.generate_batch`) by:

* ``feature``: the SAE edit at each strength (``mode`` add: a vector of that length along the
  unit decoder direction; clamp: the activation set to that value; scale: multiplied by it),
  at every position (prompt and generated);
* ``diffmean``: AxBench's DiffMean direction (:func:`.steer_metrics.diffmean_direction`: concept
  text minus neutral text, at the SAE's output site), unit length, added at the same lengths
  (with ``mode`` clamp or scale the strengths are values or factors, so DiffMean's vectors of
  those lengths are matched in number only, not in effect);
* ``prompt``: no edit, the prompt preceded by an instruction to write about the concept (one
  point, drawn flat across strengths);
* ``none``: no edit, the reference every lift is measured against.

The concept of a feature (:mod:`.concept`): ``concept=``, else its best explanation, else its
label, else the tokens that most raise it in its top examples; every result names the concept
and its source. Each continuation is scored by the unsteered model (:mod:`.steer_metrics`):
concept (the feature's re-encoded activation; the lift in log-probability of the concept text
over the unsteered continuation of the same prompt; the logit-lens lift only when the lens is
consistent with the top examples), fluency (perplexity, and distinct-2 against repetition)
and, for the edits, side effects on neutral text (KL, loss change).

Aggregation over the prompts of a half: every number is the mean over the prompts, except
perplexity, the geometric mean ``exp((1/P) sum_p nll_p)`` with ``nll_p`` the mean token NLL of
prompt p's continuation (an arithmetic mean of per-prompt perplexities would weigh the worst
prompt most). KL and loss change are means over the neutral texts of per-text means over their
non-special positions (BOS excluded, :func:`.steer_metrics.side_effects`).

No choosing on the test prompts: prompts are split in two halves (even positions select, odd
positions test). Per method the strength is chosen on the selection half (:func:`choose`): the
largest concept lift among strengths whose perplexity is at most ``fluency_limit`` (2) times the unsteered
perplexity and whose distinct-2 is at least ``diversity_limit`` (0.5) times the unsteered
one (perplexity under the unsteered model does not see degenerate repetition, distinct-2 does;
with a judge: the largest mean AxBench score, which is then the headline of every table); the
reported scores of the chosen strength, and all curves, are the test half's. When no strength
but the no-op (add 0, scale 1) passes, the method has no chosen strength and the result says so
in one line (``no_choice``); nothing is exported for it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.logit_lens import logit_lens
from llamascope_sdk.core.sites import parse_hook_point
from llamascope_sdk.evaluation.concept import RULE, Concept, feature_concept
from llamascope_sdk.evaluation.steer_metrics import (
    diffmean_direction,
    score_continuations,
    side_effects,
)
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.batch_generation import generate_batch
from llamascope_sdk.steering.conditions import Condition
from llamascope_sdk.steering.generation import prompt_ids
from llamascope_sdk.steering.interventions import Intervention
from llamascope_sdk.steering.row_edits import VectorEdit
from llamascope_sdk.steering.spec import SWEEP_MODES, make_edit

MODES = SWEEP_MODES  #: the modes the steering spec marks as swept
DEFAULT_STRENGTHS = (0.0, 10.0, 20.0, 40.0, 80.0, 160.0)
#: Held-out neutral prompts (continuations of everyday openings), our own.
NEUTRAL_PROMPTS = (
    "The best way to spend a quiet morning is",
    "When I opened the door, I saw",
    "The report published last week says that",
    "My favourite thing about the city is",
    "Yesterday the weather was",
    "The first step in making bread is",
    "Our neighbour has a small garden where",
    "The meeting started late because",
    "A good book should",
    "On the way to work I noticed",
    "The museum is open every day and",
    "She picked up the phone and said",
    "The recipe calls for",
    "In the evening we usually",
    "The old bridge over the river",
    "The children were excited because",
)
#: Held-out neutral instructions for ``chat=True`` (user messages of everyday requests), our own.
NEUTRAL_INSTRUCTIONS = (
    "Describe a quiet morning at home.",
    "What should I pack for a weekend trip?",
    "Write a short note to thank a neighbour.",
    "Tell me about your favourite season.",
    "How do I keep a houseplant alive?",
    "Give me three ideas for a rainy afternoon.",
    "Explain how to make a cup of tea.",
    "Write two sentences about a busy market.",
    "What makes a good breakfast?",
    "Describe the view from a train window.",
    "How can I get better at remembering names?",
    "Write a short story opening about a lost key.",
    "What is a good way to start a meeting?",
    "Describe an old bridge over a river.",
    "Suggest a name for a small bakery.",
    "Tell me how to plan a picnic.",
)
#: Neutral passages for side effects and DiffMean's negative side, our own.
NEUTRAL_TEXTS = (
    "The train left the station a few minutes after nine. Most passengers read or looked out "
    "of the window while the fields went by, and a man in the corner slept until the city.",
    "To repot a plant, water it the day before, loosen the soil around the edge of the pot, "
    "and lift it out gently. Trim any dead roots, then set it in fresh soil and water again.",
    "The committee met on Tuesday to discuss the budget for next year. After a long debate "
    "they agreed to spend more on the library and to repair the roof of the sports hall.",
    "Coffee is grown in many tropical countries. The beans are picked, dried and roasted, "
    "and the roasting time changes the flavour from light and fruity to dark and bitter.",
)
PROMPT_INSTRUCTION = "Write about {concept}."


@dataclass
class Point:
    """One method at one strength, averaged over a half of the prompts (NaN where undefined).

    ``perplexity`` is the geometric mean over the prompts: ``exp(mean_p nll_p)`` with
    ``nll_p`` the mean token NLL of prompt p's continuation. ``lens_lift`` is the lift of the
    feature's top-10 logit-lens tokens, only when the lens is consistent with the feature's
    top examples (:mod:`.concept`), else None."""

    method: str
    strength: float | None
    concept_activation: float
    concept_lift: float
    perplexity: float
    kl: float | None = None
    dloss: float | None = None
    judge: float | None = None
    distinct: float | None = None
    lens_lift: float | None = None


@dataclass
class FeatureEval:
    """The sweep of one feature: test-half curves per method, the chosen points, examples.

    ``concept`` is the concept text measured and ``concept_source`` where it came from
    (:func:`.concept.feature_concept`); ``headline`` names the number a strength is chosen
    by and reported first (the AxBench judge score with a judge, else the concept lift).
    ``no_choice[m]``: one line saying why method m has no chosen strength (none passed the
    fluency and diversity limits with more than the unsteered text: only the no-op did)."""

    feature: int
    label: str | None
    concept: str
    concept_measure: str
    curves: dict[str, list[Point]]
    chosen: dict[str, Point]
    chosen_on: dict[str, list[Point]]  # the selection half's curve each choice was made on
    examples: dict[str, str] = field(default_factory=dict)
    concept_source: dict[str, Any] = field(default_factory=dict)
    headline: str = "concept_lift"
    no_choice: dict[str, str] = field(default_factory=dict)
    #: with a condition (``when``): per strength, where it fired and what the edit did on the
    #: prompts where it never fired (:func:`condition_report`)
    condition: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list | tuple):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))


def _edit(sae: SAE, feature: int, mode: str, strength: float,
          when: Condition | None = None) -> Intervention:
    return make_edit(mode, sae, [feature], strength, when=when)


def condition_report(keys: Sequence[tuple[tuple[str, float | None], int]],
                     gens: Sequence[Any], scores: Sequence[Any],
                     test: Sequence[int]) -> list[dict[str, Any]]:
    """Per strength of the conditional feature edit, on the test prompts: the share where the
    condition fired at some position, and on the prompts where it never fired (``quiet``): how
    many, the share whose continuation is token for token the unsteered one, and the mean
    change of perplexity (log, nats per token) against the unsteered continuation. An edit
    that never applies leaves a prompt as it was, so these say what the condition spared."""
    plain = {i: (g, sc) for (k, i), g, sc in zip(keys, gens, scores, strict=True)
             if k == ("none", None)}
    by_strength: dict[float | None, list[tuple[int, Any, Any]]] = {}
    for (k, i), g, sc in zip(keys, gens, scores, strict=True):
        if k[0] == "feature" and i in test:
            by_strength.setdefault(k[1], []).append((i, g, sc))
    out = []
    for s, items in by_strength.items():
        quiet = [(i, g, sc) for i, g, sc in items if not g.fired]
        out.append({
            "strength": s, "fired": sum(bool(g.fired) for _, g, _ in items) / len(items),
            "quiet_prompts": len(quiet),
            "quiet_unchanged": (sum(g.ids == plain[i][0].ids for i, g, _ in quiet) / len(quiet)
                                if quiet else None),
            "quiet_dlog_perplexity": (_nanmean([sc.nll - plain[i][1].nll for i, _, sc in quiet])
                                      if quiet else None)})
    return out


def is_no_op(mode: str, strength: float | None) -> bool:
    """An edit that changes nothing: add 0, scale by 1."""
    return (mode == "add" and strength == 0) or (mode == "scale" and strength == 1)


def _nanmean(xs: Sequence[float | None]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


@dataclass
class _Sweep:
    """One feature's per-prompt scores, side effects and judge marks, averaged on demand."""

    per: dict[tuple[str, float | None], dict[int, Any]]
    fx: dict[tuple[str, float | None], tuple[float, float]]
    judged: dict[tuple[tuple[str, float | None], int], float | None]
    lens_ok: bool

    def point(self, key: tuple[str, float | None], idx: list[int]) -> Point:
        """``key`` = (method, strength) averaged over the prompts ``idx``; a zero-strength add
        or DiffMean is the unsteered run (nothing is added)."""
        base = self.per[("none", None)]
        src = self.per.get(key, base)
        lift = [_minus(src[i].concept_logprob, base[i].concept_logprob) for i in idx]
        lens = (_nanmean([src[i].lens_logprob - base[i].lens_logprob for i in idx])
                if self.lens_ok else None)
        kl, dl = self.fx.get(key, (0.0, 0.0) if key[1] == 0 else (None, None))
        jk = key if key in self.per else ("none", None)
        judge = _nanmean([self.judged.get((jk, i)) for i in idx]) if self.judged else None
        return Point(key[0], key[1], _nanmean([src[i].concept_activation for i in idx]),
                     _nanmean(lift), math.exp(_nanmean([src[i].nll for i in idx])), kl, dl, judge,
                     _nanmean([src[i].distinct for i in idx]), lens)


def _minus(a: float | None, b: float | None) -> float:
    return float("nan") if a is None or b is None else a - b


def _objective(p: Point, by_judge: bool) -> float:
    """What a strength is chosen by: the judge's mean score, else the concept lift."""
    v = p.judge if by_judge else p.concept_lift
    return v if v is not None and math.isfinite(v) else -math.inf


def choose(points: Sequence[Point], ref: Point, *, fluency_limit: float = 2.0,
           diversity_limit: float = 0.5, by_judge: bool = False) -> int | None:
    """The index of the strength chosen among ``points`` (one method, the selection half):
    the best objective (the judge's mean score, else the concept lift) among the eligible
    points, those whose perplexity is at most ``fluency_limit`` x ``ref``'s (the unsteered
    run on the same prompts) and whose distinct-2 is at least ``diversity_limit`` x ``ref``'s
    (no degenerate repetition); None when no point is eligible."""
    def fluent(p: Point) -> bool:
        if not p.perplexity <= fluency_limit * ref.perplexity:  # NaN is not eligible
            return False
        if ref.distinct is None or not math.isfinite(ref.distinct):
            return True
        return p.distinct is not None and p.distinct >= diversity_limit * ref.distinct

    ok = [j for j, p in enumerate(points) if fluent(p)]
    return max(ok, key=lambda j: _objective(points[j], by_judge)) if ok else None


@dataclass(frozen=True)
class Limits:
    """When a strength is eligible (:func:`choose`)."""

    fluency: float = 2.0
    diversity: float = 0.5

    def no_choice(self, feature: int, method: str) -> str:
        return (f"feature {feature}, {method}: no strength passed the limits (perplexity <= "
                f"{self.fluency:g}x and distinct-2 >= {self.diversity:g}x the unsteered text's, "
                "on the selection half) with a gain over no edit; nothing chosen, nothing exported")


def eval_steer(model: Any, tokenizer: Any, sae: SAE, features: Sequence[int], *,
               strengths: Sequence[float] = DEFAULT_STRENGTHS, mode: str = "add",
               prompts: Sequence[str] | None = None, concept: str | None = None,
               max_new_tokens: int = 32, baselines: bool = True, fluency_limit: float = 2.0,
               diversity_limit: float = 0.5, chat: bool = False,
               neutral_texts: Sequence[str] = NEUTRAL_TEXTS,
               judge: Callable[[list[tuple[str, str, str]]], list[float | None]] | None = None,
               when: Condition | None = None,
               on_llm_free: Callable[[list[FeatureEval]], None] | None = None,
               progress: bool = True, store: Any = None) -> list[FeatureEval]:
    """Sweep ``strengths`` for each feature and compare with the baselines (module docstring).

    Args:
        features: feature indices of ``sae``.
        strengths: per mode: add = vector length (model units), clamp = value, scale = factor.
        prompts: held-out prompts (at least 2; even positions select, odd ones test);
            default :data:`NEUTRAL_PROMPTS` (with ``chat``: :data:`NEUTRAL_INSTRUCTIONS`).
        chat: each prompt is one user message in the tokenizer's chat template and what is
            scored is the assistant's reply (instruct models); the prompt baseline puts its
            instruction in the same message. Edits still apply at every position.
        concept: the concept text (scored by log-probability; DiffMean's positive text; named
            in the prompt baseline); default by :func:`.concept.feature_concept` from the
            store's explanation, the label, or the top examples' tokens.
        store: the SAE's feature store (explanations, labels, top examples), or None.
        baselines: also run the prompt and DiffMean baselines.
        fluency_limit, diversity_limit: a strength is eligible when its perplexity is at most
            ``fluency_limit`` x the unsteered one and its distinct-2 at least
            ``diversity_limit`` x the unsteered one (:func:`choose`).
        judge: scores ``[(prompt, continuation, concept)]`` -> one number (or None) each;
            used to choose strengths and reported first (see :mod:`.judge`). It runs after
            every feature's continuations were generated and scored without it.
        on_llm_free: with a judge, called with the results without it (strengths chosen by
            the concept lift) before the judge is asked anything, so that a caller can keep
            them should the judge fail.
        when: a condition on the feature edit (conditional steering): it then applies only
            where the condition holds; :attr:`FeatureEval.condition` reports where it fired
            and the side effects on the prompts where it never did.

    Raises:
        InputError: an unknown mode, non-finite strengths, fewer than 2 prompts, a feature
            without any concept.
    """
    strengths, prompts = _check_args(mode, strengths, prompts, chat, max_new_tokens)
    feats = [int(i) for i in sae.check_features(list(features)).tolist()]
    lens = logit_lens(model, sae.W_dec[torch.tensor(feats, device=sae.device)], k=10).top_ids
    concepts = [feature_concept(f, concept=concept, labels=sae.labels, store=store,
                                lens_words=[tokenizer.decode([int(t)]) for t in lens[n].tolist()])
                for n, f in enumerate(feats)]  # every feature's concept before any work
    setup = _Setup(model, tokenizer, sae, mode, strengths, prompts, chat, max_new_tokens,
                   neutral_texts, Limits(fluency_limit, diversity_limit), judge, when)
    done = []
    for n, f in enumerate(feats):
        runs = _runs(setup, f, concepts[n], baselines)
        sweep, texts_of, cond = _generate(setup, f, concepts[n], runs, lens[n].tolist(), progress)
        done.append(_Generated(f, concepts[n], runs, sweep, texts_of, cond))
    results = [_one_feature(setup, g, baselines, by_judge=False) for g in done]
    if judge is None:
        return results
    if on_llm_free is not None:
        on_llm_free(results)  # kept even when the judge fails below
    for g in done:
        g.sweep.judged = _judged(setup, g)
    return [_one_feature(setup, g, baselines, by_judge=True) for g in done]


def _check_args(mode: str, strengths: Sequence[float], prompts: Sequence[str] | None,
                chat: bool, max_new_tokens: int) -> tuple[list[float], list[str]]:
    if mode not in MODES:
        raise InputError(f"mode {mode!r} is unknown; allowed are {', '.join(MODES)}")
    values = [float(s) for s in strengths]
    if not values or not all(math.isfinite(s) for s in values):
        raise InputError(f"strengths must be finite numbers, got {values}")
    texts = list(prompts if prompts is not None
                 else NEUTRAL_INSTRUCTIONS if chat else NEUTRAL_PROMPTS)
    if len(texts) < 2 or not all(p.strip() for p in texts):
        raise InputError(f"give at least 2 non-empty prompts (got {len(texts)}): half choose "
                         "the strength, the other half report the scores")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    return values, texts


@dataclass
class _Setup:
    """What every feature's sweep shares."""

    model: Any
    tokenizer: Any
    sae: SAE
    mode: str
    strengths: list[float]
    prompts: list[str]
    chat: bool
    max_new_tokens: int
    neutral_texts: Sequence[str]
    limits: Limits
    judge: Callable[[list[tuple[str, str, str]]], list[float | None]] | None
    when: Condition | None = None


Key = tuple[str, float | None]


def _runs(s: _Setup, f: int, concept: Concept, baselines: bool) -> dict[Key, list[Any]]:
    """Every (method, strength) of the sweep and its edits."""
    runs: dict[Key, list[Any]] = {("none", None): []}
    for x in s.strengths:
        if not (s.mode == "add" and x == 0):
            runs[("feature", x)] = [_edit(s.sae, f, s.mode, x, s.when)]
    if baselines:
        v = diffmean_direction(s.model, s.tokenizer, s.sae, [concept.text], s.neutral_texts)
        v = v / v.norm().clamp(min=1e-12)
        site = parse_hook_point(s.sae.hyperparams.hook_point_out)
        for x in s.strengths:
            if x != 0:
                runs[("diffmean", x)] = [VectorEdit((x * v).to(s.sae.device), site)]
        runs[("prompt", None)] = []
    return runs


def _generate(s: _Setup, f: int, concept: Concept, runs: dict[Key, list[Any]],
              lens: list[int], progress: bool
              ) -> tuple[_Sweep, dict[Key, dict[int, str]], list[dict[str, Any]] | None]:
    """All continuations of the feature in one batch, scored, with side effects and marks."""
    p_ids = [prompt_ids(s.tokenizer, p, chat=s.chat)[0].tolist() for p in s.prompts]
    instruction = PROMPT_INSTRUCTION.format(concept=concept.text)
    rows, row_edits, keys = [], [], []
    for key, edits in runs.items():
        for i, p in enumerate(s.prompts):
            rows.append(prompt_ids(s.tokenizer, f"{instruction}\n\n{p}", chat=s.chat)[0].tolist()
                        if key[0] == "prompt" else p_ids[i])
            row_edits.append(edits)
            keys.append((key, i))
    if progress:
        sys.stderr.write(f"feature {f}: generating {len(rows)} continuations of "
                         f"{s.max_new_tokens} tokens in one batch\n")
    gens = generate_batch(s.model, s.tokenizer, rows, row_edits, max_new_tokens=s.max_new_tokens)
    concept_ids = s.tokenizer(" " + concept.text, add_special_tokens=False)["input_ids"]
    scores = score_continuations(s.model, s.tokenizer, s.sae, f, [p_ids[i] for _, i in keys],
                                 [g.ids for g in gens], lens, concept_ids)
    per: dict[Key, dict[int, Any]] = {}
    texts_of: dict[Key, dict[int, str]] = {}
    for (key, i), sc, g in zip(keys, scores, gens, strict=True):
        per.setdefault(key, {})[i] = sc
        texts_of.setdefault(key, {})[i] = g.text
    edit_keys = [k for k in runs if k[0] in ("feature", "diffmean")]
    fx = dict(zip(edit_keys, side_effects(s.model, s.tokenizer, s.neutral_texts,
                                          [runs[k] for k in edit_keys]), strict=True))
    condition = (condition_report(keys, gens, scores, list(range(1, len(s.prompts), 2)))
                 if s.when is not None else None)
    return _Sweep(per, fx, {}, bool(concept.lens_consistent)), texts_of, condition


@dataclass
class _Generated:
    """One feature's continuations and their LLM-free scores (what a judge then reads)."""

    feature: int
    concept: Concept
    runs: dict[Key, list[Any]]
    sweep: _Sweep
    texts_of: dict[Key, dict[int, str]]
    condition: list[dict[str, Any]] | None = None


def _judged(s: _Setup, g: _Generated) -> dict[tuple[Key, int], float | None]:
    """The judge's mark of every continuation of ``g``."""
    assert s.judge is not None
    items = [(k, i) for k in g.runs for i in range(len(s.prompts))]
    marks = s.judge([(s.prompts[i], g.texts_of[k][i], g.concept.text) for k, i in items])
    return dict(zip(items, marks, strict=True))


def _one_feature(s: _Setup, g: _Generated, baselines: bool, by_judge: bool) -> FeatureEval:
    """The sweep of a feature, generated and scored: choose on one half, report the other
    (by the judge's marks when ``by_judge``)."""
    f, concept, runs, sweep, texts_of = g.feature, g.concept, g.runs, g.sweep, g.texts_of
    halves = {"select": list(range(0, len(s.prompts), 2)), "test": list(range(1, len(s.prompts), 2))}
    curves: dict[str, list[Point]] = {}
    chosen: dict[str, Point] = {}
    chosen_on: dict[str, list[Point]] = {}
    no_choice: dict[str, str] = {}
    for m in ["feature"] + (["diffmean", "prompt"] if baselines else []):
        keys_m: list[Key] = [("prompt", None)] if m == "prompt" else [(m, x) for x in s.strengths]
        sel = [sweep.point(k, halves["select"]) for k in keys_m]
        curves[m] = [sweep.point(k, halves["test"]) for k in keys_m]
        chosen_on[m] = sel
        best = choose(sel, sweep.point(("none", None), halves["select"]),
                      fluency_limit=s.limits.fluency, diversity_limit=s.limits.diversity,
                      by_judge=by_judge)
        if best is None or (m != "prompt" and is_no_op("add" if m == "diffmean" else s.mode,
                                                       keys_m[best][1])):
            no_choice[m] = s.limits.no_choice(f, m)
        else:
            chosen[m] = curves[m][best]
    curves["none"] = [sweep.point(("none", None), halves["test"])]
    examples = {f"{k[0]}@{k[1]:g}" if k[1] is not None else k[0]: texts_of[k][halves["test"][0]]
                for k in runs}
    return FeatureEval(f, s.sae.labels.get(f), concept.text, CONCEPT_MEASURE, curves, chosen,
                       chosen_on, examples, concept.as_dict() | {"rule": RULE},
                       "judge" if by_judge else "concept_lift", no_choice, g.condition)


CONCEPT_MEASURE = ("concept lift: mean over the continuation's prompts of the concept text's "
                   "mean token log-probability after the continuation, minus the same after the "
                   "unsteered continuation (nats)")

__all__ = ["eval_steer", "choose", "is_no_op", "Limits", "NEUTRAL_INSTRUCTIONS", "FeatureEval",
           "Point", "NEUTRAL_PROMPTS", "NEUTRAL_TEXTS", "DEFAULT_STRENGTHS", "MODES"]
