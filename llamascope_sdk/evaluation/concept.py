"""Which concept eval-steer measures for a feature, and where it came from.

The rule (issue 29.1), in order:

1. ``--concept TEXT``: the user's text (source ``"given"``);
2. the feature's best explanation in its feature store (``llamascope explain``; the record
   with the highest mean balanced accuracy), source ``"explanation"`` with the explainer model
   and its scores;
3. the feature's label (the SAE's or the store's; hand-written), source ``"label"``;
4. the tokens that most raise the feature in its top examples: every token of every top
   example's window weighted by the feature's activation on it, summed per token, the
   :data:`N_TOKENS` largest (source ``"top-example tokens"``).

The logit lens (the tokens the feature's decoder direction promotes) is never the concept on
its own. It is *consistent* when at least :data:`LENS_AGREE` of its top-10 tokens are among
the :data:`LENS_POOL` tokens that most raise the feature in its top examples; only then is its
lift reported (``lens_lift``), and a feature without a store, an explanation, a label or a
given concept has no concept at all (eval-steer refuses it with one line).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.store.explanations import descriptions

#: Top-example tokens that make a concept text.
N_TOKENS = 5
#: The lens is consistent when this many of its top-10 tokens are among ...
LENS_AGREE = 2
#: ... this many tokens that most raise the feature in its top examples.
LENS_POOL = 20

RULE = ("concept: --concept, else the feature's best explanation (explain), else its label, "
        f"else the {N_TOKENS} tokens that most raise it in its top examples (activation summed "
        f"per token over the windows); the logit lens is reported only when at least "
        f"{LENS_AGREE} of its top-10 tokens are among the {LENS_POOL} tokens that most raise "
        "the feature in its top examples")


@dataclass(frozen=True)
class Concept:
    """The concept text of one feature and where it came from."""

    text: str
    source: str  # "given", "explanation", "label" or "top-example tokens"
    detail: str | None = None  # e.g. the explainer model and its scores
    lens_consistent: bool | None = None  # None: no top examples to check the lens against
    lens_shared: tuple[str, ...] = ()  # lens tokens among the top-example tokens

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line: the concept and its source."""
        where = self.source + (f": {self.detail}" if self.detail else "")
        return f"{self.text!r} ({where})"


def raising_tokens(store: Any, feature: int, k: int) -> list[str]:
    """The ``k`` token texts that most raise ``feature`` in the store's top examples (the
    feature's activation on each window token, summed per token; blank tokens skipped)."""
    total: dict[str, float] = defaultdict(float)
    for e in store.examples(feature):
        for tok, a in zip(e["tokens"], e["acts"], strict=True):
            if a > 0 and tok.strip():
                total[tok.strip()] += float(a)
    return [t for t, _ in sorted(total.items(), key=lambda x: (-x[1], x[0]))[:k]]


def _explanation(store: Any, feature: int) -> tuple[str, str] | None:
    rec = descriptions(getattr(store, "path", None)).get(feature) if store is not None else None
    if not rec:
        return None
    scores = ", ".join(f"{k} {v['balanced_accuracy']:.2f}" for k, v in
                       sorted((rec.get("scores") or {}).items())
                       if v.get("balanced_accuracy") is not None)
    return str(rec["explanation"]), f"by {rec.get('model')}" + (f", {scores}" if scores else ", unscored")


def feature_concept(feature: int, *, concept: str | None, labels: dict[int, str],
                    store: Any, lens_words: list[str]) -> Concept:
    """The concept of ``feature`` by the module's rule; ``lens_words`` its top-10 logit-lens
    token texts.

    Raises:
        InputError: no concept given, no store, no explanation and no label.
    """
    pool = raising_tokens(store, feature, LENS_POOL) if store is not None else []
    lens = [w.strip() for w in lens_words if w.strip()]
    shared = tuple(w for w in lens if w in pool)
    consistent = (len(shared) >= LENS_AGREE) if pool else None
    found: tuple[str, str, str | None] | None = None
    if concept:
        found = (concept.strip(), "given", None)
    elif (ex := _explanation(store, feature)) is not None:
        found = (ex[0], "explanation", ex[1])
    elif labels.get(feature) or (store is not None and store.labels.get(feature)):
        found = (labels.get(feature) or store.labels[feature], "label", "hand-written")
    elif pool:
        words = pool[:N_TOKENS]
        found = (" ".join(words), "top-example tokens", ", ".join(repr(w) for w in words))
    if found is None:
        raise InputError(f"feature {feature} has no concept to measure: no --concept, no "
                         "explanation or label, and no feature store with its top examples",
                         hint="give --concept TEXT, or mine a store first (llamascope inspect)")
    return Concept(found[0], found[1], found[2], consistent, shared)

