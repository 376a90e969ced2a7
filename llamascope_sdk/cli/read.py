"""Reading features: ``encode`` shows the top features of every token of a prompt, ``show``
prints one feature from a feature store, ``search`` ranks the features most specific to a text.

Labels, tokens and examples go to the terminal through ``say``/``table`` (control characters
made visible)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llamascope_sdk.cli.app import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    PromptOpt,
    RevisionOpt,
    SaeOpt,
    app,
    check_text,
    command,
    echo_json,
    load_sae_and_model,
    say,
    table,
)

StoreOpt = Annotated[str | None, typer.Option(
    "--store", help="A feature store folder (from `llamascope inspect`) for the statistics. "
    "[default: the SAE's own statistics, else the store in the default location]",
    show_default=False)]


@app.command()
@command
def encode(sae: SaeOpt, prompt: PromptOpt = None, model: ModelOpt = None,
           top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Features per token.")] = 5,
           include_special: Annotated[bool, typer.Option(help="Also read BOS/EOS/pad positions.")] = False,
           device: DeviceOpt = "cpu", dtype: DtypeOpt = None, revision: RevisionOpt = None,
           gate: Annotated[str, typer.Option(help="reference (the authors' gate) or saelens (to compare with SAELens/Neuronpedia).")] = "reference",
           as_json: JsonOpt = False) -> None:
    """Show the top features of every token of a prompt.

    Features that fire on more than 10% of tokens (from the SAE's statistics, when it has
    them) are marked 'dense': they say little about this prompt.
    """
    from llamascope_sdk.core.metrics import DENSE_FREQUENCY
    from llamascope_sdk.loading import demo
    from llamascope_sdk.steering.reading import encode_report, read_features

    if prompt is None and demo.is_demo(sae):
        prompt = demo.DEMO_PROMPT
    if prompt is None:
        raise typer.BadParameter("give --prompt TEXT", param_hint="--prompt")
    check_text(prompt)
    s, lm, tok = load_sae_and_model(sae, model, device, dtype, revision, gate)
    reading = read_features(lm, tok, s, prompt, top_k=top_k, include_special=include_special)
    freq = s.stats.frequency if s.stats is not None else None
    if as_json:
        out = encode_report(reading, s)
        echo_json(out)
        return

    def cell(f: int, v: float) -> str:
        tag = " dense" if freq is not None and float(freq[f]) > DENSE_FREQUENCY else ""
        label = f" '{s.labels[f]}'" if f in s.labels else ""
        return f"{f} ({v:.2f}{tag}){label}"

    top = reading.top[s.name]
    rows = [[i, repr(t), ", ".join(cell(f, v) for f, v in top[i]) or "-"]
            for i, t in enumerate(reading.tokens)]
    table(f"top {top_k} features of {s.name} (activation; 'dense' = fires on "
          f">{100 * DENSE_FREQUENCY:g}% of tokens)", ["pos", "token", "feature (activation)"], rows)


def _example_text(e: dict[str, Any]) -> str:
    return "".join(f"[[{t}]]" if k == e["max_index"] else t for k, t in enumerate(e["tokens"]))


@app.command()
@command
def show(store: Annotated[str, typer.Argument(help="A feature store folder, or an SAE name (any spelling) whose store is in the default location.")],
         feature: Annotated[int, typer.Argument(help="Feature index.")],
         examples: Annotated[int, typer.Option("--examples", "-n", min=0, help="Top examples to print.")] = 10,
         as_json: JsonOpt = False) -> None:
    """Print a feature's summary and top examples from a feature store (no model needed)."""
    from llamascope_sdk.explain import feature_explanations
    from llamascope_sdk.store import view
    from llamascope_sdk.store.explanation_view import explanation_lines
    from llamascope_sdk.store.feature_store import load_store
    from llamascope_sdk.store.scores import load_scores

    st = load_store(store)
    scores = load_scores(st.path)
    sc = scores.get(st.check_feature(feature)) if scores is not None else None
    if as_json:
        echo_json({**view.feature(st, feature), **feature_explanations(st.path, feature),
                   **({"scores": sc} if sc else {})})
        return
    s = view.summary(st, feature)
    label = f" '{s['label']}'" if s["label"] else ""
    say(f"{st.name} feature {feature}{label}{'  [dense]' if s['dense'] else ''}")
    for line in explanation_lines(st, feature):
        say(line)
    say(f"frequency {100 * s['frequency']:.3g}%   typical {s['typical']:.4g}   "
        f"mean {s['mean']:.4g}   max {s['max']:.4g}   ({s['n_tokens']:,} tokens)")
    if s["neuronpedia_url"]:
        say(f"neuronpedia: {s['neuronpedia_url']}")
    if sc:
        say(f"output score {sc['output_score']:.3g} (#{sc['output_score_rank']:,} of "
            f"{sc['scored']:,} scored)   delta token confidence {sc['delta_token_confidence']:+.3g}")
    say(f"steer: {s['steer']}" if s["steer"] else
        "steer: none (the feature never fired on the mined corpus: no typical activation)")
    lens = view.logit_lens(st, feature)
    if lens:
        say("promotes: " + " ".join(repr(t) for t, _ in lens["promoted"][:8]))
        say("suppresses: " + " ".join(repr(t) for t, _ in lens["suppressed"][:8]))
    rows = [[f"{e['max']:.3g}", f"{e['doc']}:{e['pos']}", repr(_example_text(e))]
            for e in st.examples(feature)[:examples]]
    if rows:
        table("top examples ([[max token]])", ["max", "doc:pos", "context"], rows)
    else:
        say("(never fired on the mined corpus)")


def _top_by_output_score(sae: str, store: str | None, top: int, include_dense: bool,
                         as_json: bool) -> None:
    """``search --sort output-score`` without a prompt: the store's best-scored features (no
    model needed), dense ones left out unless asked for."""
    from llamascope_sdk.core.metrics import DENSE_FREQUENCY
    from llamascope_sdk.loading import demo
    from llamascope_sdk.store.feature_store import load_store
    from llamascope_sdk.store.scores import SCORES_FILE, FeatureScores
    from llamascope_sdk.store.view import steer_command

    st = load_store(store if store is not None else sae)
    if st.path is None or not (st.path / SCORES_FILE).is_file():
        raise typer.BadParameter(f"the store {st.path} has no {SCORES_FILE}: run `llamascope "
                                 f"score-features --sae {sae} --store {st.path}` first",
                                 param_hint="--sort")
    scores = FeatureScores.load(st.path)
    freq, typical = st.stats.frequency, st.stats.typical
    hits: list[dict[str, Any]] = []
    for i in scores.top(st.d_sae):
        dense = float(freq[i]) > DENSE_FREQUENCY
        if dense and not include_dense:
            continue
        hits.append({"feature": i, **(scores.get(i) or {}), "frequency": float(freq[i]),
                     "dense": dense, "label": st.labels.get(i)})
        if len(hits) == top:
            break
    spec = "demo" if demo.is_demo(sae) else sae
    cmd = (steer_command(spec, hits[0]["feature"], relative=True,
                         typical=float(typical[hits[0]["feature"]])) if hits else None)
    if as_json:
        echo_json({"sae": st.name, "sort": "output-score", "hits": hits, "steer": cmd})
        return
    from llamascope_sdk.cli.eval_steer import score_table

    score_table(f"{st.name}: the {len(hits)} features with the highest output score (of "
                f"{hits[0]['scored'] if hits else 0} scored)", hits)
    if cmd:
        typer.echo(f"steer the top hit: {cmd}")


@app.command()
@command
def search(sae: SaeOpt,
           prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Text that shows the concept.", show_default=False)] = None,
           text: Annotated[str | None, typer.Option("--text", help="Instead of --prompt: search the explanations (llamascope explain) in the store for these words; no model needed.", show_default=False)] = None,
           vs: Annotated[str | None, typer.Option("--vs", help="Contrast text: rank by the difference of mean activations.", show_default=False)] = None,
           store: StoreOpt = None,
           top: Annotated[int, typer.Option("--top", "-k", min=1, help="Features to list.")] = 10,
           include_dense: Annotated[bool, typer.Option(help="Also list dense features (firing on more than 10% of tokens; marked dense).")] = False,
           sort: Annotated[str, typer.Option("--sort", help="specificity, or output-score: the 5 x --top most specific features sorted by their output score (needs `llamascope score-features` on the store).")] = "specificity",
           model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
           revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Rank the features most specific to a text (activation on it relative to the feature's
    typical activation, down-weighted by firing frequency; or against --vs) and print the
    steer command for the top hit (none for a feature that never fired in the statistics)."""
    from llamascope_sdk.loading import demo
    from llamascope_sdk.store.feature_store import default_store_dir, load_store
    from llamascope_sdk.store.search import search_features
    from llamascope_sdk.store.view import steer_command

    if text is not None:
        _search_text(sae, store, text, top, as_json)
        return
    if prompt is None and sort == "output-score":
        _top_by_output_score(sae, store, top, include_dense, as_json)
        return
    if prompt is None:
        raise typer.BadParameter("give --prompt TEXT (or --text WORDS to search explanations, or "
                                 "--sort output-score alone for the best-scored features)",
                                 param_hint="--prompt")
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
    if found_store is not None:
        found_store.check_sae(s)  # statistics and scores of another SAE would mislead
    if found_store is not None and (store is not None or s.stats is None):
        stats = found_store.stats
    if sort == "output-score":
        from llamascope_sdk.store.scores import FeatureScores

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
    _print_hits(s.name, hits, scores is not None, vs is not None, cmd, spec, relative=s.stats is not None)


def _search_text(sae: str, store: str | None, text: str, top: int, as_json: bool) -> None:
    """``search --text``: the store's explanations matching the words (no model loaded)."""
    from llamascope_sdk.store.explanation_view import search_descriptions
    from llamascope_sdk.store.feature_store import load_store


    check_text(text, "--text")
    st = load_store(store if store is not None else sae)
    found = search_descriptions(st, text, top)
    if as_json:
        echo_json({"sae": st.name, "text": text, "hits": found})
    else:
        table(f"explanations of {st.name} matching {text!r}", ["feature", "explanation", "scores", "explainer"],
              [[h["feature"], h["explanation"], h["scores"], h["model"]] for h in found])


def _print_hits(name: str, hits: list[Any], with_scores: bool, with_vs: bool, cmd: str | None,
                spec: str, *, relative: bool) -> None:
    """The search results as a table, then the steer command of the best hit that fired."""
    from llamascope_sdk.store.view import steer_command

    rows = [[h.feature, f"{h.score:.3g}", f"{h.prompt_mean:.3g}"
             + ("" if h.vs_mean is None else f" vs {h.vs_mean:.3g}"),
             f"{h.typical:.3g}", f"{100 * h.frequency:.3g}%" + (" dense" if h.dense else ""),
             h.label or ""] for h in hits]
    how = "mean(prompt) - mean(vs)" if with_vs else "mean / typical x -log(frequency)"
    cols = ["feature", "score", "mean act", "typical", "frequency", "label"]
    if with_scores:
        cols.insert(2, "output score")
        for r, h in zip(rows, hits, strict=True):
            r.insert(2, f"{h.output_score:.3g}")
        how += "; sorted by output score"
    table(f"features of {name} most specific to the prompt (score = {how})", cols, rows)
    if cmd:
        say(f"try: {cmd}")
    elif hits:
        fired = next((h for h in hits if h.typical > 0), None)
        alt = (steer_command(spec, fired.feature, relative=relative,
                             typical=fired.typical) if fired else None)
        say(f"feature {hits[0].feature} never fired in the mined statistics: it has no typical "
            "activation to steer by (mine more tokens)"
            + (f"; the best hit that fired: {alt}" if alt else ""))
    else:
        say("no feature fires on this text (dense features hidden: --include-dense)")
