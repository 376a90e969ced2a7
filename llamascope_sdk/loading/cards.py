"""Model cards: one README.md per checkpoint, from the Jinja template and family data in cards/.

The data (``families.yaml``) and the template (``template.md.j2``) live in the repository's
``cards/`` folder, next to the code that renders them; ``huggingface_hub.ModelCard`` writes the
YAML front matter. ``render_card`` takes a registry :class:`SaeRef` (a released checkpoint) or a
plain dict describing a custom SAE (what the training export passes); ``render_all`` writes the
256 release cards plus a demo card.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import atomic_write_text
from llamascope_sdk.base.errors import HookpointNotFoundError
from llamascope_sdk.base.paths import PACKAGE_DIR
from llamascope_sdk.core.sites import parse_hook_point, position_of
from llamascope_sdk.loading.demo import DEMO_SAE_DIR
from llamascope_sdk.loading.registry import ALL_SAES, BASE_MODEL, D_MODEL, SaeRef, resolve

_METRIC_LABELS = (
    ("l0_mean", "L0 (mean active features per token)"),
    ("explained_variance_centred", "explained variance, centred: 1 - SSE / sum ‖y - mean y‖²"),
    ("explained_variance_uncentred", "explained variance, uncentred (paper): 1 - SSE / sum ‖y‖²"),
    ("mse", "MSE per element (model units)"),
    ("delta_lm_loss", "delta LM loss (nats; spliced CE - clean CE)"),
    ("kl_div", "KL(clean ‖ spliced) (nats)"),
    ("loss_recovered", "loss recovered vs zero ablation"),
    ("frac_dead", "dead features (fraction; none fired)"),
    ("frac_dense", "dense features (fraction; fired on > 10% of tokens)"),
    ("ce_clean", "clean cross-entropy (nats)"),
    ("ce_spliced", "cross-entropy with the reconstruction spliced in (nats)"),
)
#: EvalResult keys that describe the run rather than the SAE; shown in the context line or not at all.
_RUN_KEYS = {"sae", "hook_point_in", "hook_point_out", "model", "n_tokens", "n_targets",
             "n_sequences", "context", "include_special", "l0", "n_dead", "n_dense",
             "dense_threshold", "ce_zero_ablation", "kl_direction", "feature_frequency",
             "exclude_norm_above", "n_excluded"}


def cards_dir() -> Path:
    """The folder holding template.md.j2 and families.yaml: $LLAMASCOPE_CARDS_DIR, the
    repository's cards/, or a copy shipped in the package (llamascope_sdk/assets/cards)."""
    candidates = [Path(p) for p in [os.environ.get("LLAMASCOPE_CARDS_DIR")] if p]
    candidates += [PACKAGE_DIR.parent / "cards", PACKAGE_DIR / "assets" / "cards"]
    for c in candidates:
        if (c / "template.md.j2").is_file() and (c / "families.yaml").is_file():
            return c
    raise FileNotFoundError(
        "model-card template not found: looked in " + ", ".join(str(c) for c in candidates)
        + "; set LLAMASCOPE_CARDS_DIR to a folder holding template.md.j2 and families.yaml")


@lru_cache(maxsize=4)
def _load(folder: str) -> tuple[dict[str, Any], str]:
    import yaml  # a dependency of huggingface_hub

    data = yaml.safe_load((Path(folder) / "families.yaml").read_text(encoding="utf-8"))
    return data, (Path(folder) / "template.md.j2").read_text(encoding="utf-8")


def _family() -> tuple[dict[str, Any], str]:
    return _load(str(cards_dir()))


def _as_dict(metrics: Any) -> dict[str, Any]:
    return metrics.to_dict() if hasattr(metrics, "to_dict") else dict(metrics)


def _is_columns(metrics: Any) -> bool:
    """True for ``{column label: EvalResult or its dict}`` (several runs side by side)."""
    return (isinstance(metrics, Mapping) and bool(metrics)
            and all(isinstance(v, Mapping) or hasattr(v, "to_dict") for v in metrics.values()))


def _metric_rows(d: dict[str, Any]) -> dict[str, str]:
    """{label: formatted value}: labelled metrics first, then any other scalar (e.g. from
    training); run descriptors (:data:`_RUN_KEYS`) are left out."""
    known = dict(_METRIC_LABELS)
    keys = [k for k in known if k in d] + [k for k in d if k not in known and k not in _RUN_KEYS]
    rows = {}
    for key in keys:
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            continue
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        rows[known.get(key, key).replace("|", "/")] = text.replace("|", "/")
    return rows


def _metric_context(d: dict[str, Any]) -> str:
    ctx = [f"{d[k]:,} {w}" for k, w in (("n_tokens", "tokens"),) if isinstance(d.get(k), int)]
    ctx += [f"context {d['context']}"] if d.get("context") else []
    ctx += [f"model {d['model']}"] if d.get("model") else []
    return ", ".join(ctx)


def _metric_table(metrics: Any) -> tuple[list[str], list[tuple[str, list[str]]], str]:
    """(column labels, (label, values) rows, one-line context) from one EvalResult or dict, or
    from ``{column label: EvalResult or dict}``; the context is the first column's, plus how
    many positions each column left out by ``exclude_norm_above``."""
    if metrics is None:
        return ["value"], [], ""
    columns = ({str(k): _as_dict(v) for k, v in metrics.items()} if _is_columns(metrics)
               else {"value": _as_dict(metrics)})
    tables = {c: _metric_rows(d) for c, d in columns.items()}
    labels = list(dict.fromkeys(label for t in tables.values() for label in t))
    rows = [(label, [t.get(label, "-") for t in tables.values()]) for label in labels]
    ctx = [_metric_context(next(iter(columns.values())))]
    ctx += [f"{c}: {d['n_excluded']:,} position(s) with input norm > "
            f"{d['exclude_norm_above']:.4g} left clean and not counted" for c, d in columns.items()
            if d.get("exclude_norm_above") is not None]
    return list(columns), rows, "; ".join(c for c in ctx if c)


def _release_fields(ref: SaeRef, data: dict[str, Any]) -> dict[str, Any]:
    pos, width = data["positions"][ref.position], data["widths"][ref.expansion]
    short = f"L{ref.layer}{ref.position}-{'32k' if ref.expansion == 8 else '128k'}"
    saelens = ref.saelens_id
    return {
        "is_release": True, "title": f"Llama Scope {ref.name}: {pos['title']}, layer {ref.layer}",
        "summary": pos["summary"].format(layer=ref.layer), "warning": pos.get("warning"),
        "note": pos.get("note"), "layer": ref.layer, "position": ref.position,
        "position_title": pos["title"], "d_sae": ref.d_sae, "d_model": D_MODEL,
        "width_label": width["label"], "base_model": BASE_MODEL,
        "hook_point_in": ref.hook_point_in, "hook_point_out": ref.hook_point_out,
        "hf_in": ref.hf_in, "hf_out": ref.hf_out, "load_name": short, "canonical_name": ref.name,
        "saelens_id": None if saelens is None else f"{saelens[0]} / {saelens[1]}",
        "neuronpedia_id": ref.neuronpedia_id, "neuronpedia_url": ref.neuronpedia_url,
        "hub_label": f"{ref.repo_id()} / {ref.subfolder()}",
        "hub_url": f"https://huggingface.co/{ref.repo_id()}/tree/main/{ref.subfolder()}",
        "tokens_line": f"This checkpoint ({width['label']} features) was trained on "
                       f"{width['tokens']}.",
        "recipe": [], "family_recipe": _family_recipe(data, width["tokens"]),
        "tags": [*data["common"]["tags"], pos["kind_tag"], f"layer-{ref.layer}"],
        "model_name": f"Llama Scope {ref.name}",
    }


def _custom_fields(info: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    required = ("layer", "position", "d_model", "d_sae", "hook_point_in", "hook_point_out")
    missing = [k for k in required if k not in info]
    if missing:
        raise ValueError(f"custom SAE card info is missing {missing}; required are {list(required)}")

    pos_key = str(info["position"]).upper()
    pos = data["positions"].get(pos_key, {"title": pos_key, "summary": "", "kind_tag": "sae"})
    name = info.get("name") or f"L{info['layer']}{pos_key}"
    recipe = [{"item": k, "released": str(v), "paper": ""} for k, v in (info.get("recipe") or {}).items()]
    sites = [parse_hook_point(info[k]) for k in ("hook_point_in", "hook_point_out")]
    return {
        "is_release": False, "title": f"{name}: {pos['title']}, layer {info['layer']}",
        "summary": info.get("summary") or pos["summary"].format(layer=info["layer"]),
        "warning": info.get("warning"), "note": info.get("note"), "layer": info["layer"],
        "position": pos_key, "position_title": pos["title"], "d_sae": info["d_sae"],
        "d_model": info["d_model"], "width_label": f"{info['d_sae'] // info['d_model']}x",
        "base_model": info.get("model", BASE_MODEL),
        "hook_point_in": info["hook_point_in"], "hook_point_out": info["hook_point_out"],
        "hf_in": info.get("hf_in") or sites[0].describe(),
        "hf_out": info.get("hf_out") or sites[1].describe(),
        "load_name": info.get("load_name") or info.get("repo_id") or name,
        "neuronpedia_id": info.get("neuronpedia_id"), "neuronpedia_url": info.get("neuronpedia_url"),
        "hub_label": info.get("repo_id"),
        "hub_url": f"https://huggingface.co/{info['repo_id']}" if info.get("repo_id") else None,
        "tokens_line": "Trained with llamascope-sdk; the recipe as exported:" if recipe
                       else "No training recipe was recorded.",
        "recipe": recipe, "command": info.get("command"), "extra": info.get("extra"),
        "metrics_note": info.get("metrics_note"), "architecture": info.get("architecture"),
        "family_recipe": (_family_recipe(data, info.get("tokens", "not recorded"))
                          if info.get("recipe_variant")
                          else []),
        "family_line": f"The run follows the **{info.get('recipe_variant')}** column of the "
                       "Llama Scope recipe; the released script and the paper differ as follows:",
        "tags": [*data["common"]["tags"], pos["kind_tag"], *info.get("tags", [])],
        "model_name": name,
    }


def _family_recipe(data: dict[str, Any], tokens: str) -> list[dict[str, Any]]:
    """The released-script-vs-paper rows of families.yaml, ``{tokens}`` filled in."""
    return [{**row, "released": str(row["released"]).format(tokens=tokens)} for row in data["recipe"]]


def render_card(ref_or_info: SaeRef | str | dict[str, Any], metrics: Any = None) -> str:
    """The README.md text (YAML front matter + markdown) for one SAE.

    Args:
        ref_or_info: a registry :class:`SaeRef` (or any name :func:`resolve` accepts) for a
            released checkpoint, or a dict describing a custom SAE with keys ``layer``,
            ``position``, ``d_model``, ``d_sae``, ``hook_point_in``, ``hook_point_out`` and
            optionally ``name``, ``model`` (base model id), ``recipe`` (dict), ``metrics``,
            ``repo_id``, ``load_name``, ``hf_in``/``hf_out``, ``tags``, ``datasets``,
            ``license``, ``warning``, ``note``, ``summary``, ``architecture``,
            ``recipe_variant`` ("released" or "paper": adds the family's released-script-vs-
            paper table; ``tokens`` fills its tokens row), ``command`` (the exact command that built it), ``metrics_note``
            (markdown under the metrics table) and ``extra`` (markdown sections before the
            citation).
        metrics: an :class:`~llamascope_sdk.evaluation.evaluate.EvalResult` or its ``to_dict()``, or
            ``{column label: either}`` for several runs side by side; overrides
            ``info["metrics"]``.

    Returns:
        The card text; ``huggingface_hub.ModelCard(text).data`` parses its front matter.

    Example:
        >>> (folder / "README.md").write_text(render_card(resolve("L12M-128k")))
    """
    from huggingface_hub import ModelCard, ModelCardData

    data, template = _family()
    common = data["common"]
    if isinstance(ref_or_info, str):

        ref_or_info = resolve(ref_or_info)
    if isinstance(ref_or_info, SaeRef):
        fields, info = _release_fields(ref_or_info, data), {}
    else:
        fields, info = _custom_fields(ref_or_info, data), ref_or_info
    columns, rows, ctx = _metric_table(metrics if metrics is not None else info.get("metrics"))
    card_data = ModelCardData(
        library_name=common["library_name"], base_model=fields["base_model"],
        license=info.get("license", common["license"]),
        datasets=info.get("datasets", common["datasets"]), tags=fields["tags"],
        model_name=fields["model_name"])
    math_note = ("For a transcoder s_in and s_out differ (the input is RMS-normalised, n_in ~ 64) "
                 "and must not be merged." if fields["position"] == "TC" else
                 "For an SAE s_in = s_out, so the gate reads ||d_i|| h_i / s > theta.")
    fields["architecture"] = fields.get("architecture") or (
        "JumpReLU SAE (trained Top-K, K = 50; one global threshold)"
        if fields["position"] != "TC" else "JumpReLU transcoder (trained Top-K, K = 50)")
    card = ModelCard.from_template(
        card_data, template_str=template, metrics=rows, metric_columns=columns,
        metrics_context=ctx, math_note=math_note, paper_title=common["paper"]["title"],
        paper_url=common["paper"]["url"], **fields)
    return str(card)


def sae_card(sae: Any, lm_config: dict[str, Any] | None = None) -> str:
    """The card of an SAE that came with none, from the one template: the release card of a
    Llama Scope checkpoint, else a custom card from the SAE's own facts (hyperparams, base
    model, threshold; where it was converted from)."""
    if sae.ref is not None:
        return render_card(sae.ref)

    hp = sae.hyperparams
    lm = lm_config or sae.lm_config or {}
    base = str(lm.get("model_name") or BASE_MODEL)
    kind = "transcoder" if hp.is_transcoder else "sparse autoencoder"
    try:
        sites = parse_hook_point(hp.hook_point_in), parse_hook_point(hp.hook_point_out)
    except HookpointNotFoundError:
        sites = None
    try:
        position = "TC" if hp.is_transcoder else position_of(*sites) if sites else "?"
    except HookpointNotFoundError:  # a foreign SAE reading one site and writing another
        position = "?"
    gate = (f"one threshold θ = {float(sae.threshold):.6g}" if hp.act_fn == "jumprelu" and
            not sae.per_feature_threshold else "one threshold per feature"
            if hp.act_fn == "jumprelu" else f"k = {hp.top_k}" if hp.act_fn == "topk" else "ReLU")
    source = (hp.model_extra or {}).get("converted_from") or {}
    info: dict[str, Any] = {
        "name": sae.name, "layer": sites[1].layer if sites else "?", "position": position,
        "d_model": hp.d_model, "d_sae": hp.d_sae, "hook_point_in": hp.hook_point_in,
        "hook_point_out": hp.hook_point_out, "model": base, "load_name": "<this folder or repo>",
        "summary": f"A {hp.act_fn} {kind} on `{base}` ({gate}), saved with llamascope-sdk in the "
                   "Llama Scope release layout.",
        "architecture": f"{hp.act_fn} {kind} ({gate})", "tags": ["llamascope", hp.act_fn],
        "note": f"Converted from a {source['format']} checkpoint." if source.get("format") else None,
    }
    if sites is None:  # a hook point the site table does not know: name it as it is
        info.update(hf_in=hp.hook_point_in, hf_out=hp.hook_point_out)
    return render_card(info)


def render_all(out_dir: str | os.PathLike[str], metrics: dict[str, Any] | str | None = None,
               *, demo: bool = True) -> list[Path]:
    """Write ``out_dir/<name>/README.md`` for each of the 256 checkpoints (and ``demo/``).

    Args:
        out_dir: where the card folders go.
        metrics: ``{sae name: EvalResult or its dict}`` (any spelling :func:`resolve` accepts)
            or the path of a JSON file holding that mapping, as written from ``evaluate``.
        demo: also write the bundled demo SAE's card (the one shipped beside its checkpoint,
            rendered by ``training/build_demo.py`` from its measured metrics) as ``demo/``.

    Returns:
        The paths written, the demo card last.
    """

    table: dict[str, Any] = (json.loads(Path(metrics).read_text(encoding="utf-8"))
                             if isinstance(metrics, str | os.PathLike) else metrics or {})
    by_name = {resolve(k).name: v for k, v in table.items()}
    out, paths = Path(out_dir), []
    for ref in ALL_SAES:
        path = out / ref.name / "README.md"
        atomic_write_text(path, render_card(ref, by_name.get(ref.name)))
        paths.append(path)
    if demo:

        path = out / "demo" / "README.md"
        atomic_write_text(path, (DEMO_SAE_DIR / "README.md").read_text(encoding="utf-8"))
        paths.append(path)
    return paths
