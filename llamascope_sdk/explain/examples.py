"""Which mined contexts the explainer sees and which the scorers are tested on.

:func:`example_sets` is the one place that reads examples out of a feature store. With a store
that keeps delphi's stratified sample (``decile_examples``, ``non_activating``; store version
2 and later), the split is:

* explainer: within every decile, examples ``[0::2]``; then up to ``n_explain`` of them, taken
  round-robin from the highest decile down (so every decile is shown before any twice);
* scorers (held out: never shown to the explainer): within every decile, examples ``[1::2]``,
  up to ``n_score`` taken the same way, and up to ``n_score`` non-activating contexts.

A feature is skipped (no request at all; the record and the run's summary say why) when its
held-out activating contexts are fewer than ``min_activating`` or its non-activating contexts
fewer than ``min_non_activating`` (both 5 by default: one scorer prompt of each class, delphi's
default of 5 examples per scorer prompt): a score needs positives and negatives, and one from
1-3 negatives would say nothing. Every score reports the positives and negatives it rests on.

An older store (version 1: top examples and a quantile sample, no non-activating contexts)
still gets explanations, from its top examples; its scorers are skipped (``non_activating`` is
empty) and the result says how to re-mine. The sample is a uniform sample of firings, so a
fixed every-other split of it is uniform too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Context:
    """A window of tokens with the feature's activation on each (0 where it did not fire)."""

    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    doc: int = -1
    pos: int = -1

    @classmethod
    def from_example(cls, e: dict[str, Any]) -> Context:
        return cls(tuple(e["tokens"]), tuple(float(a) for a in e["acts"]),
                   int(e.get("doc", -1)), int(e.get("pos", -1)))

    @property
    def key(self) -> tuple[int, int]:
        return (self.doc, self.pos)

    def as_dict(self) -> dict[str, Any]:
        return {"doc": self.doc, "pos": self.pos, "max": max(self.acts, default=0.0)}


@dataclass(frozen=True)
class ExampleSets:
    """The examples of one feature: what the explainer sees and what the scorers test."""

    explain: list[Context]
    activating: list[Context]      # held out, for the scorers
    non_activating: list[Context]  # for the scorers
    source: str                    # "deciles" or "top" (an older store)
    note: str | None = None        # why scoring is impossible, when it is
    skip: str | None = None        # why the feature is not worth a request (too few to score)


def round_robin(groups: Sequence[Sequence[Context]], n: int) -> list[Context]:
    """Up to ``n`` items: the first of every group, then the second of every group, ..."""
    out: list[Context] = []
    depth = max((len(g) for g in groups), default=0)
    for k in range(depth):
        for g in groups:
            if k < len(g):
                out.append(g[k])
                if len(out) == n:
                    return out
    return out


def _deciles(store: Any, i: int) -> list[list[Context]] | None:
    """The feature's decile examples (highest decile first), or None for a store that has
    none (version 1 raises StoreVersionError, a ValueError)."""
    if not hasattr(store, "decile_examples"):
        return None
    try:
        bands = store.decile_examples(i)
    except ValueError:
        return None
    return [[Context.from_example(e) for e in d["examples"]] for d in bands]


#: Held-out activating and non-activating contexts a feature needs to be scored (delphi's
#: default number of examples per scorer prompt).
MIN_ACTIVATING = 5
MIN_NON_ACTIVATING = 5


def too_few(n_held: int, n_non: int, min_activating: int, min_non_activating: int) -> str | None:
    """Why a feature cannot be scored (one line), or None."""
    if n_held < min_activating:
        return (f"skipped: {n_held} held-out activating context(s), fewer than the "
                f"{min_activating} a score needs (the feature fired too rarely in the mined corpus)")
    if n_non < min_non_activating:
        return (f"skipped: {n_non} non-activating context(s), fewer than the "
                f"{min_non_activating} a score needs (a near-dense feature: mine more tokens or a "
                "larger --nonactivating-pool)")
    return None


def example_sets(store: Any, i: int, *, n_explain: int = 20, n_score: int = 50,
                 min_activating: int = MIN_ACTIVATING,
                 min_non_activating: int = MIN_NON_ACTIVATING) -> ExampleSets:
    """Split feature ``i``'s mined contexts as the module docstring says."""
    meta = getattr(store, "meta", {}) or {}
    deciles = _deciles(store, i)
    if deciles is not None:
        explain = round_robin([d[0::2] for d in deciles], n_explain)
        held = round_robin([d[1::2] for d in deciles], n_score)
        non = [Context.from_example(e) for e in store.non_activating(i)][:n_score]
        why = None if non or not explain else (
            "the store has no context where this feature is silent (a dense feature, or mined "
            "with --non-activating 0), so the explanation was not scored")
        skip = too_few(len(held), len(non), min_activating, min_non_activating) if explain else None
        return ExampleSets(explain, held, non, "deciles", why, skip)
    top = [Context.from_example(e) for e in store.examples(i)][:n_explain]
    seen = {c.key for c in top}
    held = [c for c in (Context.from_example(e) for e in store.examples(i, "samples"))
            if c.key not in seen][:n_score]
    sae = meta.get("sae_spec") or meta.get("sae") or "SAE"
    note = (f"this store (version {meta.get('version', 1)}) has no non-activating contexts, so "
            f"the explanation was not scored; re-mine it: llamascope inspect --sae {sae} "
            "--dataset FILE --out FOLDER")
    return ExampleSets(top, held, [], "top", note)
