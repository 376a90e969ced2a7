"""What is shown about a mined feature: its summary, quantile bands, histogram, logit lens and
the ``llamascope steer`` command that tries it.

Functions of a :class:`~llamascope_sdk.store.feature_store.FeatureStore` (which stores, and reads its
examples back with ``store.examples``), shared by the HTML pages, ``llamascope show`` and
``search``. Everything returned is JSON-ready.
"""

from __future__ import annotations

import shlex
from typing import Any

from llamascope_sdk.core.metrics import DENSE_FREQUENCY
from llamascope_sdk.mining.mine import quantile_bands
from llamascope_sdk.store.feature_store import FeatureStore


def steer_command(sae_spec: str, feature: int, *, relative: bool, typical: float,
                  strength: float = 4.0) -> str | None:
    """``llamascope steer`` for a feature: ``--relative -a 4`` when the SAE carries statistics,
    else the same strength in model units (4 x typical). None when the feature never fired
    (``typical`` 0): there is no size to steer it by, and ``-a 0.0`` would change nothing."""
    spec = shlex.quote(sae_spec)
    if not typical > 0:
        return None
    if relative:
        return f"llamascope steer --sae {spec} -f {feature} --relative -a {strength:g}"
    return f"llamascope steer --sae {spec} -f {feature} -a {strength * typical:.1f}"


def store_steer_command(store: FeatureStore, i: int, strength: float = 4.0) -> str | None:
    """:func:`steer_command` for feature ``i`` of ``store``, with the SAE spelled as mined."""
    return steer_command(str(store.meta.get("sae_spec") or store.name), i,
                         relative=bool(store.meta.get("sae_has_stats")),
                         typical=float(store.stats.typical[i]), strength=strength)


def is_dense(store: FeatureStore, i: int) -> bool:
    """Fires on more than :data:`~llamascope_sdk.core.metrics.DENSE_FREQUENCY` of the tokens."""
    return float(store.stats.frequency[i]) > DENSE_FREQUENCY


def bands(store: FeatureStore, i: int, per_band: int = 4) -> list[dict[str, Any]]:
    """Quantile bands of the feature's sample, highest first: ``{"label", "examples"}``, at
    most ``per_band`` examples each, evenly spread over the band (the sample holds 100)."""
    ex = store.examples(i, "samples")
    nb = int(store.meta.get("n_bands", 4))
    out = []
    for q, (a, b) in enumerate(quantile_bands(len(ex), nb)):
        lo, hi = 100 - round(100 * (q + 1) / nb), 100 - round(100 * q / nb)
        band = ex[a:b]
        if len(band) > per_band:
            band = [band[round(j * (len(band) - 1) / max(1, per_band - 1))] for j in range(per_band)]
        out.append({"label": f"{lo}-{hi}th percentile of firings", "examples": band})
    return out


def histogram(store: FeatureStore, i: int) -> list[dict[str, float]]:
    """Non-empty bins of feature ``i``: ``{"lo", "hi", "count"}`` (lo exclusive)."""
    i = store.check_feature(i)
    edges = [0.0, *[float(x) for x in store.meta["histogram_edges"]], float("inf")]
    c = store.hist[i].tolist()
    return [{"lo": edges[b], "hi": edges[b + 1], "count": int(n)} for b, n in enumerate(c) if n]


def logit_lens(store: FeatureStore, i: int) -> dict[str, list[tuple[str, float]]] | None:
    """Tokens feature ``i``'s decoder direction promotes and suppresses (None if not mined)."""
    lens = store.lens
    if lens is None:
        return None
    i = store.check_feature(i)
    return {"promoted": [(store.token_text(t), float(v)) for t, v in
                         zip(lens.top_ids[i].tolist(), lens.top_values[i].tolist(), strict=True)],
            "suppressed": [(store.token_text(t), float(v)) for t, v in
                           zip(lens.bottom_ids[i].tolist(), lens.bottom_values[i].tolist(), strict=True)]}


def summary(store: FeatureStore, i: int) -> dict[str, Any]:
    """Label, frequency, typical/mean/max activation, dense flag, links and steer command."""
    i = store.check_feature(i)
    url = store.meta.get("neuronpedia_url")
    return {"feature": i, "sae": store.name, "label": store.labels.get(i),
            "frequency": float(store.stats.frequency[i]),
            "typical": float(store.stats.typical[i]), "mean": float(store.stats.mean[i]),
            "max": float(store.top.values[i, 0]), "dense": is_dense(store, i),
            "n_tokens": int(store.stats.n_tokens),
            "neuronpedia_url": f"{url}/{i}" if url else None,
            "steer": store_steer_command(store, i)}


def feature(store: FeatureStore, i: int) -> dict[str, Any]:
    """Everything about feature ``i``, JSON-ready (``llamascope show --json``)."""
    return {**summary(store, i), "top_examples": store.examples(i),
            "quantiles": bands(store, i), "histogram": histogram(store, i),
            "logit_lens": logit_lens(store, i)}


__all__ = ["bands", "feature", "histogram", "is_dense", "logit_lens",
           "steer_command", "store_steer_command", "summary"]
