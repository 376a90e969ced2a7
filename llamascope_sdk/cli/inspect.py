"""Finding features: ``inspect`` mines a corpus into a feature store with HTML pages, ``show``
prints one feature from a store, ``search`` ranks the features most specific to a text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .app import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    RevisionOpt,
    SaeOpt,
    app,
    check_text,
    command,
    echo_json,
    load_sae_and_model,
    table,
)

FeaturesOpt = Annotated[list[int] | None, typer.Option(
    "--features", "--feature", "-f", help="Features to write pages for; repeat for several. "
    "Every feature is mined either way. [default: labelled features, then the most frequent, "
    "up to --max-pages]", show_default=False)]
StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="A feature store folder (from `llamascope inspect`) for the statistics. "
    "[default: the SAE's own statistics, else the store in the default location]",
    show_default=False)]


SaesOpt = Annotated[list[str], typer.Option(
    "--sae", "-s", help="SAE: a Llama Scope name, a local folder, or 'demo'. Repeat for several: "
    "they share one model pass, and each gets its own store OUT/<name>.")]


@app.command()
@command
def inspect(sae: SaesOpt,
            dataset: Annotated[str, typer.Option("--dataset", "-d", help="A .txt/.jsonl/.parquet file (comma-separated for several) or a Hugging Face dataset name.")],
            tokens: Annotated[int, typer.Option("--tokens", "-t", min=1, help="Tokens to read (BOS included).")] = 100_000,
            features: FeaturesOpt = None,
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Store folder to write. [default: $LLAMASCOPE_CACHE/features/<sae>]", show_default=False)] = None,
            context: Annotated[int, typer.Option(min=2, help="Tokens per document (longer ones are cut).")] = 256,
            batch_size: Annotated[int, typer.Option(min=1, help="Documents per forward.")] = 8,
            top_n: Annotated[int, typer.Option(min=1, help="Top examples kept per feature.")] = 20,
            samples: Annotated[int, typer.Option(min=0, help="Firings sampled per feature for the quantile bands.")] = 16,
            pages: Annotated[bool, typer.Option(help="Write HTML pages under OUT/pages.")] = True,
            max_pages: Annotated[int, typer.Option(min=0, help="At most this many feature pages.")] = 1000,
            save_stats_to: Annotated[Path | None, typer.Option("--save-stats-to", help="Also write feature_stats.safetensors into this folder (e.g. the SAE's own local folder, so that `steer --relative` finds it).", show_default=False)] = None,
            split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "train",
            text_field: Annotated[str, typer.Option(help="Text column/field of .jsonl/.parquet/HF data.")] = "text",
            model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
            revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Mine every feature of an SAE on a corpus: top examples, quantile samples, statistics,
    histogram and logit lens, written to a feature store with HTML pages (progress on stderr).

    Relative steering then works with the mined statistics: pass --save-stats-to the SAE's
    folder, or in Python: sae.stats = FeatureStats.load(STORE).
    """
    from llamascope_sdk import demo
    from llamascope_sdk.compat import check_compatible
    from llamascope_sdk.feature_store import default_store_dir
    from llamascope_sdk.mining import mine
    from llamascope_sdk.models import check_fits_window
    from llamascope_sdk.sae import SAE

    specs = {name: "demo" if demo.is_demo(name) else name for name in sae}  # checked once
    first, lm, tok = load_sae_and_model(sae[0], model, device, dtype, revision)
    check_fits_window(lm, context, what="--context")
    saes = {name: first for name in sae[:1]}
    for name in sae[1:]:
        other = SAE.from_pretrained(name, revision=revision, device=device)
        check_compatible(lm, other)
        saes[name] = other
    if len({s.name for s in saes.values()}) != len(saes):
        raise typer.BadParameter("give each SAE once", param_hint="--sae")
    if save_stats_to is not None and len(saes) > 1:
        raise typer.BadParameter("--save-stats-to takes one SAE", param_hint="--save-stats-to")
    for s in saes.values():
        for f in features or []:
            s.check_features(f)
    results = mine(lm, tok, list(saes.values()), dataset, tokens=tokens, context=context,
                   batch_size=batch_size, top_n=top_n, n_samples=samples, split=split,
                   text_field=text_field)
    reports = []
    for name, s in saes.items():
        target = (out if len(saes) == 1 else (out / s.name if out else None)) or default_store_dir(s.name)
        reports.append(_write_store(name, specs[name], s, results[s.name], lm, tok, target,
                                    dataset=dataset,
                                    model=model, features=features, pages=pages,
                                    max_pages=max_pages, save_stats_to=save_stats_to))
    if as_json:
        echo_json(reports[0] if len(reports) == 1 else reports)
        return
    for r in reports:
        typer.echo(f"mined {r['d_sae']} features of {r['sae']} on {r['n_tokens']:,} tokens "
                   f"({r['n_docs']:,} documents)")
        typer.echo(f"store: {r['store']}")
        if r["index"]:
            typer.echo(f"pages: {r['index']}")
        for f, cmd in r["steer"].items():
            typer.echo(f"  feature {f}: {cmd}")
    typer.echo(f"next: llamascope show {reports[0]['store']} FEATURE   |   in Python: "
               f"sae.stats = FeatureStats.load({reports[0]['store']!r})")
    if save_stats_to is None and Path(sae[0]).expanduser().is_dir() and specs[sae[0]] != "demo":
        typer.echo(f"hint: --save-stats-to {sae[0]} makes `steer --relative` work for this SAE",
                   err=True)


def _write_store(spec_name: str, spec: str, s: Any, result: Any, lm: Any, tok: Any, target: Path, *,
                 dataset: str, model: str | None, features: list[int] | None, pages: bool,
                 max_pages: int, save_stats_to: Path | None) -> dict[str, Any]:
    """Write one SAE's store (and pages, and optionally its statistics); what was written."""
    from llamascope_sdk.feature_store import FeatureStore
    from llamascope_sdk.pages import write_pages

    has_stats = s.stats is not None
    if save_stats_to is not None:
        path = result.stats.save(Path(save_stats_to).expanduser().resolve())
        typer.echo(f"feature statistics written to {path}", err=True)
        sae_dir = Path(spec_name).expanduser()
        has_stats = has_stats or (sae_dir.is_dir() and sae_dir.resolve() == path.parent)
    store = FeatureStore.from_result(result, tok, model=lm, sae_spec=spec, corpus=dataset,
                                     model_name=model or getattr(lm, "name_or_path", None))
    store.meta["sae_has_stats"] = has_stats

    def add_pages(st: FeatureStore, tmp: Path) -> None:
        write_pages(st, tmp / "pages", features, max_pages)

    store.save(target, extra=add_pages if pages else None)
    index = target / "pages" / "index.html" if pages else None
    return {"store": str(target), "index": str(index) if index else None, "sae": s.name,
            "d_sae": s.d_sae, "n_tokens": result.n_tokens, "n_docs": result.n_docs,
            "features": [store.summary(f) for f in (features or [])],
            "steer": {f: store.steer_command(f) for f in (features or [])}}


def _example_text(e: dict[str, Any]) -> str:
    return "".join(f"[[{t}]]" if k == e["max_index"] else t for k, t in enumerate(e["tokens"]))


@app.command()
@command
def show(store: Annotated[str, typer.Argument(help="A feature store folder, or an SAE name whose store is in the default location.")],
         feature: Annotated[int, typer.Argument(help="Feature index.")],
         examples: Annotated[int, typer.Option("--examples", "-n", min=0, help="Top examples to print.")] = 10,
         as_json: JsonOpt = False) -> None:
    """Print a feature's summary and top examples from a feature store (no model needed)."""
    from llamascope_sdk.explain import feature_explanations
    from llamascope_sdk.explain.view import explanation_lines
    from llamascope_sdk.feature_scores import load_scores
    from llamascope_sdk.feature_store import load_store

    st = load_store(store)
    scores = load_scores(st.path)
    sc = scores.get(st.check_feature(feature)) if scores is not None else None
    if as_json:
        echo_json({**st.feature(feature), **feature_explanations(st.path, feature),
                   **({"scores": sc} if sc else {})})
        return
    s = st.summary(feature)
    label = f" '{s['label']}'" if s["label"] else ""
    typer.echo(f"{st.name} feature {feature}{label}{'  [dense]' if s['dense'] else ''}")
    for line in explanation_lines(st, feature):
        typer.echo(line)
    typer.echo(f"frequency {100 * s['frequency']:.3g}%   typical {s['typical']:.4g}   "
               f"mean {s['mean']:.4g}   max {s['max']:.4g}   ({s['n_tokens']:,} tokens)")
    if s["neuronpedia_url"]:
        typer.echo(f"neuronpedia: {s['neuronpedia_url']}")
    if sc:
        typer.echo(f"output score {sc['output_score']:.3g} (#{sc['output_score_rank']:,} of "
                   f"{st.d_sae:,})   delta token confidence {sc['delta_token_confidence']:+.3g}")
    typer.echo(f"steer: {s['steer']}")
    lens = st.logit_lens(feature)
    if lens:
        typer.echo("promotes: " + " ".join(repr(t) for t, _ in lens["promoted"][:8]))
        typer.echo("suppresses: " + " ".join(repr(t) for t, _ in lens["suppressed"][:8]))
    from rich.markup import escape

    rows = [[f"{e['max']:.3g}", f"{e['doc']}:{e['pos']}", escape(repr(_example_text(e)))]
            for e in st.examples(feature)[:examples]]
    if rows:
        table(escape("top examples ([[max token]])"), ["max", "doc:pos", "context"], rows)
    else:
        typer.echo("(never fired on the mined corpus)")


@app.command()
@command
def search(sae: SaeOpt,
           prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text that shows the concept.", show_default=False)] = None,
           text: Annotated[str | None, typer.Option("--text", help="Instead of --prompt: search the explanations (llamascope explain) in the store for these words; no model needed.", show_default=False)] = None,
           vs: Annotated[str | None, typer.Option("--vs", help="Contrast text: rank by the difference of mean activations.", show_default=False)] = None,
           store: StoreOpt = None,
           top: Annotated[int, typer.Option("--top", "-k", min=1, help="Features to list.")] = 10,
           include_dense: Annotated[bool, typer.Option(help="Also list features that fire on more than half of all tokens (marked dense).")] = False,
           sort: Annotated[str, typer.Option("--sort", help="specificity, or output-score: the 5 x --top most specific features sorted by their output score (needs `llamascope score-features` on the store).")] = "specificity",
           model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
           revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Rank the features most specific to a text (activation on it relative to the feature's
    typical activation, down-weighted by firing frequency; or against --vs) and print the
    steer command for the top hit."""
    from rich.markup import escape

    from llamascope_sdk import demo
    from llamascope_sdk.feature_store import default_store_dir, load_store
    from llamascope_sdk.search import search_features, steer_command

    if text is not None:
        from llamascope_sdk.explain.view import search_descriptions

        check_text(text, "--text")
        st = load_store(store if store is not None else default_store_dir(
            demo.DEMO_SAE_NAME if demo.is_demo(sae) else sae))
        found = search_descriptions(st, text, top)
        if as_json:
            echo_json({"sae": st.name, "text": text, "hits": found})
        else:
            table(f"explanations of {st.name} matching {text!r}", ["feature", "explanation", "scores", "explainer"],
                  [[h["feature"], escape(h["explanation"]), h["scores"], escape(h["model"])] for h in found])
        return
    if prompt is None:
        raise typer.BadParameter("give --prompt TEXT (or --text WORDS to search explanations)", param_hint="--prompt")
    check_text(prompt)
    if vs is not None:
        check_text(vs, "--vs")
    if sort not in ("specificity", "output-score"):
        raise typer.BadParameter(f"{sort!r}: allowed are specificity and output-score",
                                 param_hint="--sort")
    s, lm, tok = load_sae_and_model(sae, model, device, dtype, revision)
    stats, scores = None, None
    wanted = store is not None or s.stats is None or sort == "output-score"
    found_store = (load_store(store) if store is not None else load_store(default_store_dir(s.name))
                   if wanted and default_store_dir(s.name).is_dir() else None)
    if found_store is not None and (store is not None or s.stats is None):
        stats = found_store.stats
    if sort == "output-score":
        from llamascope_sdk.feature_scores import FeatureScores

        if found_store is None or found_store.path is None:
            raise typer.BadParameter("--sort output-score reads the scores of a feature store: "
                                     "give --store DIR (scored by `llamascope score-features`)",
                                     param_hint="--store")
        scores = FeatureScores.load(found_store.path).output_score
    hits = search_features(lm, tok, s, prompt, vs=vs, stats=stats, top=top,
                           include_dense=include_dense, output_scores=scores)
    spec = "demo" if demo.is_demo(sae) else sae
    cmd = (steer_command(spec, hits[0].feature, relative=s.stats is not None,
                         typical=hits[0].typical) if hits else None)
    if as_json:
        echo_json({"sae": s.name, "prompt": prompt, "vs": vs,
                   "score": "mean_prompt - mean_vs" if vs else "mean_prompt / typical * -log(frequency)",
                   "hits": [h.to_dict() for h in hits], "steer": cmd})
        return
    rows = [[h.feature, f"{h.score:.3g}", f"{h.prompt_mean:.3g}"
             + ("" if h.vs_mean is None else f" vs {h.vs_mean:.3g}"),
             f"{h.typical:.3g}", f"{100 * h.frequency:.3g}%" + (" dense" if h.dense else ""),
             escape(h.label or "")] for h in hits]
    how = "mean(prompt) - mean(vs)" if vs else "mean / typical x -log(frequency)"
    cols = ["feature", "score", "mean act", "typical", "frequency", "label"]
    if scores is not None:
        cols.insert(2, "output score")
        for r, h in zip(rows, hits, strict=True):
            r.insert(2, f"{h.output_score:.3g}")
        how += "; sorted by output score"
    table(f"features of {s.name} most specific to the prompt (score = {how})", cols, rows)
    if cmd:
        typer.echo(f"try: {cmd}")
    else:
        typer.echo("no feature fires on this text (dense features hidden: --include-dense)")
