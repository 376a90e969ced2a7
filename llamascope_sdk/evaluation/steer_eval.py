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

Each continuation is scored by the unsteered model (:mod:`.steer_metrics`): concept (the
feature's re-encoded activation; the lift in log-probability of the concept text, or without
one of the feature's top logit-lens tokens, over the unsteered continuation of the same
prompt), fluency (perplexity, and distinct-2 against repetition) and, for the edits, side
effects on neutral text (KL, loss change).

No choosing on the test prompts: prompts are split in two halves (even positions select, odd
positions test). Per method the strength is chosen on the selection half (:func:`choose`): the
largest concept lift among strengths whose perplexity is at most ``fluency_limit`` (2) times the unsteered
perplexity and whose distinct-2 is at least ``diversity_limit`` (0.5) times the unsteered
one (perplexity under the unsteered model does not see degenerate repetition, distinct-2 does;
with a judge: the largest mean AxBench score); the reported scores of the chosen strength, and
all curves, are the test half's.
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
from llamascope_sdk.evaluation.steer_metrics import (
    diffmean_direction,
    score_continuations,
    side_effects,
)
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.batch_generation import generate_batch
from llamascope_sdk.steering.generation import prompt_ids
from llamascope_sdk.steering.interventions import Clamp, Intervention, Scale, Steer
from llamascope_sdk.steering.row_edits import VectorEdit

MODES = ("add", "clamp", "scale")
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
    """One method at one strength, averaged over a half of the prompts (NaN where undefined)."""

    method: str
    strength: float | None
    concept_activation: float
    concept_lift: float
    perplexity: float
    kl: float | None = None
    dloss: float | None = None
    judge: float | None = None
    distinct: float | None = None


@dataclass
class FeatureEval:
    """The sweep of one feature: test-half curves per method, the chosen points, examples."""

    feature: int
    label: str | None
    concept: str
    concept_measure: str
    curves: dict[str, list[Point]]
    chosen: dict[str, Point]
    chosen_on: dict[str, list[Point]]  # the selection half's curve each choice was made on
    examples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v

        return clean(asdict(self))


def _edit(sae: SAE, feature: int, mode: str, strength: float) -> Intervention:
    if mode == "add":
        return Steer(sae, [feature], strength)
    if mode == "clamp":
        return Clamp(sae, [feature], strength)
    return Scale(sae, [feature], strength)


def _nanmean(xs: Sequence[float | None]) -> float:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else float("nan")


@dataclass
class _Sweep:
    """One feature's per-prompt scores, side effects and judge marks, averaged on demand."""

    per: dict[tuple[str, float | None], dict[int, Any]]
    fx: dict[tuple[str, float | None], tuple[float, float]]
    judged: dict[tuple[tuple[str, float | None], int], float | None]
    by_concept_text: bool

    def point(self, key: tuple[str, float | None], idx: list[int]) -> Point:
        """``key`` = (method, strength) averaged over the prompts ``idx``; a zero-strength add
        or DiffMean is the unsteered run (nothing is added)."""
        base = self.per[("none", None)]
        src = self.per.get(key, base)
        if self.by_concept_text:
            lift = [_minus(src[i].concept_logprob, base[i].concept_logprob) for i in idx]
        else:
            lift = [src[i].lens_logprob - base[i].lens_logprob for i in idx]
        kl, dl = self.fx.get(key, (0.0, 0.0) if key[1] == 0 else (None, None))
        jk = key if key in self.per else ("none", None)
        judge = _nanmean([self.judged.get((jk, i)) for i in idx]) if self.judged else None
        return Point(key[0], key[1], _nanmean([src[i].concept_activation for i in idx]),
                     _nanmean(lift), math.exp(_nanmean([src[i].nll for i in idx])), kl, dl, judge,
                     _nanmean([src[i].distinct for i in idx]))


def _minus(a: float | None, b: float | None) -> float:
    return float("nan") if a is None or b is None else a - b


def _objective(p: Point, by_judge: bool) -> float:
    """What a strength is chosen by: the judge's mean score, else the concept lift."""
    v = p.judge if by_judge else p.concept_lift
    return v if v is not None and math.isfinite(v) else -math.inf


def choose(points: Sequence[Point], ref: Point, *, fluency_limit: float = 2.0,
           diversity_limit: float = 0.5, by_judge: bool = False) -> int:
    """The index of the strength chosen among ``points`` (one method, the selection half):
    the best objective (the judge's mean score, else the concept lift) among the eligible
    points, those whose perplexity is at most ``fluency_limit`` x ``ref``'s (the unsteered
    run on the same prompts) and whose distinct-2 is at least ``diversity_limit`` x ``ref``'s
    (no degenerate repetition); the first point (strength 0 in the usual sweep) when none is."""
    def fluent(p: Point) -> bool:
        if not p.perplexity <= fluency_limit * ref.perplexity:  # NaN is not eligible
            return False
        if ref.distinct is None or not math.isfinite(ref.distinct):
            return True
        return p.distinct is not None and p.distinct >= diversity_limit * ref.distinct

    ok = [j for j, p in enumerate(points) if fluent(p)] or [0]
    return max(ok, key=lambda j: _objective(points[j], by_judge))


def eval_steer(model: Any, tokenizer: Any, sae: SAE, features: Sequence[int], *,
               strengths: Sequence[float] = DEFAULT_STRENGTHS, mode: str = "add",
               prompts: Sequence[str] | None = None, concept: str | None = None,
               max_new_tokens: int = 32, baselines: bool = True, fluency_limit: float = 2.0,
               diversity_limit: float = 0.5, chat: bool = False,
               neutral_texts: Sequence[str] = NEUTRAL_TEXTS,
               judge: Callable[[list[tuple[str, str, str]]], list[float | None]] | None = None,
               progress: bool = True) -> list[FeatureEval]:
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
            in the prompt baseline when the feature has no label); default the feature's top
            logit-lens tokens.
        baselines: also run the prompt and DiffMean baselines.
        fluency_limit, diversity_limit: a strength is eligible when its perplexity is at most
            ``fluency_limit`` x the unsteered one and its distinct-2 at least
            ``diversity_limit`` x the unsteered one (:func:`choose`).
        judge: scores ``[(prompt, continuation, concept)]`` -> one number (or None) each;
            used to choose strengths and reported (see :mod:`.steer_judge`).

    Raises:
        InputError: an unknown mode, non-finite strengths, fewer than 2 prompts.
    """

    if mode not in MODES:
        raise InputError(f"mode {mode!r} is unknown; allowed are {', '.join(MODES)}")
    strengths = [float(s) for s in strengths]
    if not strengths or not all(math.isfinite(s) for s in strengths):
        raise InputError(f"strengths must be finite numbers, got {strengths}")
    prompts = list(prompts if prompts is not None
                   else NEUTRAL_INSTRUCTIONS if chat else NEUTRAL_PROMPTS)
    if len(prompts) < 2 or not all(p.strip() for p in prompts):
        raise InputError(f"give at least 2 non-empty prompts (got {len(prompts)}): half choose "
                         "the strength, the other half report the scores")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    feats = [int(i) for i in sae.check_features(list(features)).tolist()]
    site = parse_hook_point(sae.hyperparams.hook_point_out)
    lens = logit_lens(model, sae.W_dec[torch.tensor(feats, device=sae.device)], k=10).top_ids
    p_ids = [prompt_ids(tokenizer, p, chat=chat)[0].tolist() for p in prompts]
    concept_ids = (tokenizer(" " + concept.strip(), add_special_tokens=False)["input_ids"]
                   if concept else None)
    halves = {"select": list(range(0, len(prompts), 2)), "test": list(range(1, len(prompts), 2))}
    results = []
    for n, f in enumerate(feats):
        lens_words = [tokenizer.decode([int(t)]) for t in lens[n].tolist()]
        desc = sae.labels.get(f) or concept or "the words " + ", ".join(
            repr(w.strip()) for w in lens_words[:5])
        runs: dict[tuple[str, float | None], list[Any]] = {("none", None): []}
        for s in strengths:
            if not (mode in ("add",) and s == 0):
                runs[("feature", s)] = [_edit(sae, f, mode, s)]
        if baselines:
            texts = [concept] if concept else [" ".join(w.strip() for w in lens_words)]
            v = diffmean_direction(model, tokenizer, sae, texts, neutral_texts)
            v = v / v.norm().clamp(min=1e-12)
            for s in strengths:
                if s != 0:
                    runs[("diffmean", s)] = [VectorEdit((s * v).to(sae.device), site)]
            runs[("prompt", None)] = []
        rows: list[list[int]] = []
        row_edits, keys = [], []
        for key, edits in runs.items():
            for i, p in enumerate(prompts):
                rows.append(prompt_ids(tokenizer, f"{PROMPT_INSTRUCTION.format(concept=desc)}"
                                       f"\n\n{p}", chat=chat)[0].tolist()
                            if key[0] == "prompt" else p_ids[i])
                row_edits.append(edits)
                keys.append((key, i))
        if progress:
            sys.stderr.write(f"feature {f}: generating {len(rows)} continuations of "
                             f"{max_new_tokens} tokens in one batch\n")
        gens = generate_batch(model, tokenizer, rows, row_edits, max_new_tokens=max_new_tokens)
        scores = score_continuations(model, tokenizer, sae, f, [p_ids[i] for _, i in keys],
                                     [g.ids for g in gens], lens[n].tolist(), concept_ids)
        per: dict[tuple[str, float | None], dict[int, Any]] = {}
        texts_of: dict[tuple[str, float | None], dict[int, str]] = {}
        for (key, i), sc, g in zip(keys, scores, gens, strict=True):
            per.setdefault(key, {})[i] = sc
            texts_of.setdefault(key, {})[i] = g.text
        edit_keys = [k for k in runs if k[0] in ("feature", "diffmean")]
        fx = dict(zip(edit_keys, side_effects(model, tokenizer, neutral_texts,
                                              [runs[k] for k in edit_keys]), strict=True))
        judged: dict[tuple[tuple[str, float | None], int], float | None] = {}
        if judge is not None:
            items = [(k, i) for k in runs for i in range(len(prompts))]
            marks = judge([(prompts[i], texts_of[k][i], desc) for k, i in items])
            judged = dict(zip(items, marks, strict=True))

        sweep = _Sweep(per, fx, judged, bool(concept_ids))
        point = sweep.point

        curves: dict[str, list[Point]] = {}
        chosen: dict[str, Point] = {}
        chosen_on: dict[str, list[Point]] = {}
        methods = ["feature"] + (["diffmean", "prompt"] if baselines else [])
        for m in methods:
            keys_m = [("prompt", None)] if m == "prompt" else [(m, s) for s in strengths]
            sel = [point(k, halves["select"]) for k in keys_m]
            curves[m] = [point(k, halves["test"]) for k in keys_m]
            chosen_on[m] = sel
            best = choose(sel, point(("none", None), halves["select"]),
                          fluency_limit=fluency_limit, diversity_limit=diversity_limit,
                          by_judge=judge is not None)
            chosen[m] = curves[m][best]
        curves["none"] = [point(("none", None), halves["test"])]
        examples = {f"{k[0]}@{k[1]:g}" if k[1] is not None else k[0]: texts_of[k][halves["test"][0]]
                    for k in runs}
        results.append(FeatureEval(
            f, sae.labels.get(f), desc, "concept text log-probability lift (nats)" if concept_ids
            else "log-probability lift of the feature's top-10 logit-lens tokens (nats)",
            curves, chosen, chosen_on, examples))
    return results


__all__ = ["eval_steer", "choose", "NEUTRAL_INSTRUCTIONS", "FeatureEval", "Point", "NEUTRAL_PROMPTS", "NEUTRAL_TEXTS",
           "DEFAULT_STRENGTHS", "MODES"]
