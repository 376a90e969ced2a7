"""Explanations where users look: feature pages, ``show`` and ``search --text`` (pages are refreshed by
:func:`llamascope_sdk.store.pages.refresh_pages`).

The other modules call these few functions (one line each), so a page, ``show`` and
``show --json`` say the same thing: every explainer's description with its detection and
fuzzing scores and the model that wrote it, then the LLM-free VocabProj and TokenChange.
"""

from __future__ import annotations

import html
import re
from typing import Any

from llamascope_sdk.store.explanations import descriptions, feature_explanations


def _scores(rec: dict[str, Any]) -> str:
    parts = [f"{k} {v['balanced_accuracy']:.2f}" for k, v in sorted((rec.get("scores") or {}).items())
             if v.get("balanced_accuracy") is not None]
    return ", ".join(parts) if parts else "not scored"


def explanation_lines(store: Any, i: int) -> list[str]:
    """Plain-text lines for ``llamascope show`` (empty when nothing is known)."""
    info = feature_explanations(getattr(store, "path", None), i)
    lines = [f"explanation: {r['explanation']!r}  ({_scores(r)}; balanced accuracy, chance "
             f"0.50; by {r['model']})" for r in info["explanations"]]
    free = info["llm_free"] or {}
    if free.get("token_change"):
        lines.append("TokenChange (adding it raises): "
                     + " ".join(repr(t) for t, _ in free["token_change"]["tokens"][:8]))
    return lines


def explanation_html(store: Any, i: int) -> str:
    """The explanations block of a feature page (an empty string when there are none)."""
    info = feature_explanations(getattr(store, "path", None), i)
    rows = [f'<div class="label">{html.escape(r["explanation"])}</div>'
            f'<p class="muted">{html.escape(_scores(r))} (balanced accuracy on held-out '
            f'contexts, chance 0.50) &middot; explainer {html.escape(r["model"])} &middot; '
            f'prompt {html.escape(r["prompt_version"])}</p>' for r in info["explanations"]]
    free = info["llm_free"] or {}
    if free.get("token_change"):
        toks = " ".join(f"<code>{html.escape(t)}</code>" for t, _ in free["token_change"]["tokens"][:10])
        rows.append(f'<p>Adding it raises (TokenChange): {toks}</p>')
    if not rows:
        return ""
    return '<div id="explanations"><h2>Explanation</h2>' + "".join(rows) + "</div>"


def search_descriptions(store: Any, text: str, top: int = 10) -> list[dict[str, Any]]:
    """Features whose best explanation contains the most words of ``text`` (case-insensitive);
    ties go to the higher mean score, then the lower index."""
    words = set(re.findall(r"\w+", text.lower()))
    hits = []
    for i, rec in descriptions(getattr(store, "path", None)).items():
        have = set(re.findall(r"\w+", str(rec["explanation"]).lower()))
        n = len(words & have)
        if n:
            scores = [v["balanced_accuracy"] for v in (rec.get("scores") or {}).values()
                      if v.get("balanced_accuracy") is not None]
            mean = sum(scores) / len(scores) if scores else None
            hits.append({"feature": i, "matched": n, "explanation": rec["explanation"],
                         "scores": _scores(rec), "mean_score": mean, "model": rec["model"]})
    hits.sort(key=lambda h: (-h["matched"], -(h["mean_score"] or -1.0), h["feature"]))
    return hits[:top]
