"""One PNG per feature of a strength sweep: concept and fluency against strength, per method.

matplotlib is imported only here (the ``plot`` extra: ``pip install 'llamascope-sdk[plot]'``).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import atomic_write_bytes
from llamascope_sdk.base.errors import InputError

_STYLE = {"feature": ("tab:red", "o"), "diffmean": ("tab:blue", "s"), "prompt": ("tab:green", "")}


def plot_sweep(result: Any, path: str | Path) -> Path:
    """Draw ``result`` (a :class:`~llamascope_sdk.evaluation.steer_eval.FeatureEval`) to ``path``: four
    panels (concept lift, the feature's activation, perplexity, distinct-2) against strength, the test
    half's values, the chosen strength of each method circled; the prompt baseline is a
    dashed horizontal line. Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("plots need matplotlib", hint="pip install 'llamascope-sdk[plot]'") from None
    panels = [("concept_lift", "concept lift (nats)"),
              ("concept_activation", "feature activation (re-encoded)"),
              ("perplexity", "perplexity (unsteered model)"),
              ("distinct", "distinct-2 (1 = no repeated bigram)")]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for method, pts in result.curves.items():
            if method not in _STYLE:
                continue
            color, marker = _STYLE[method]
            ys = [getattr(p, key) for p in pts]
            if method == "prompt":
                if ys and ys[0] is not None and math.isfinite(ys[0]):
                    ax.axhline(ys[0], color=color, ls="--", label="prompt baseline")
                continue
            xs = [p.strength for p in pts]
            ax.plot(xs, ys, color=color, marker=marker, label=method)
            c = result.chosen.get(method)
            if c is not None:
                ax.scatter([c.strength], [getattr(c, key)], s=160, facecolors="none",
                           edgecolors=color, linewidths=2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("strength")
        if key == "perplexity":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    label = f" '{result.label}'" if result.label else ""
    fig.suptitle(f"feature {result.feature}{label}: test-half scores, chosen strength circled",
                 fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
