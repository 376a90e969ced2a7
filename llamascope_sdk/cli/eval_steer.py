"""Does the steer work? ``score-features`` ranks every feature of an SAE by how well it is likely
to steer (output score, ΔToken Confidence) into its feature store; ``eval-steer`` sweeps
strengths and measures concept, fluency and side effects against baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from llamascope_sdk.cli.app import (
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


def _store_folder(store: str | None, sae_name: str) -> Path:
    """The store to write into: ``--store``, else the SAE's store in the default location;
    it must be a complete store (mined by ``llamascope inspect``)."""
    from llamascope_sdk.store.feature_store import FeatureStore, default_store_dir

    folder = Path(store).expanduser() if store else default_store_dir(sae_name)
    FeatureStore.load(folder)  # refuses a folder that is not a complete store, with a hint
    return folder


@app.command("score-features")
@command
def score_features_cmd(
        sae: SaeOpt,
        store: Annotated[str | None, typer.Option("--store", help="Feature store folder to add feature_scores.safetensors to (its pages are rewritten with the scores). [default: the SAE's store in the default location]", show_default=False)] = None,
        features: Annotated[list[int] | None, typer.Option("--feature", "-f", help="Score only these features (the others stay unscored). [default: all]", show_default=False)] = None,
        prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Neutral prompt, edited at its last token. [default: 'From my experience,' as in Arad et al.]", show_default=False)] = None,
        amplification: Annotated[float, typer.Option(min=0.0, help="Added length = this x the largest activation at the last token.")] = 10.0,
        batch_size: Annotated[int, typer.Option(min=1, help="Features per forward.")] = 256,
        top: Annotated[int, typer.Option("--top", "-k", min=0, help="Best features to print.")] = 10,
        model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
        revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Score every feature by how likely it is to steer: the output score (Arad et al. 2025)
    and the change in next-token confidence (Wang et al. 2025), one amplified forward per
    feature, batched. Written into the feature store for `show`, the pages and
    `search --sort output-score`."""
    from llamascope_sdk.store.feature_store import FeatureStore
    from llamascope_sdk.store.pages import write_pages
    from llamascope_sdk.store.scores import DEFINITIONS, OUTPUT_SCORE_PROMPT, score_features

    text = check_text(prompt) if prompt is not None else OUTPUT_SCORE_PROMPT
    if store is not None:
        _store_folder(store, sae)  # a bad --store is reported before anything loads
    s, lm, tok = load_sae_and_model(sae, model, device, dtype, revision)
    folder = _store_folder(store, s.name)
    for f in features or []:
        s.check_features(f)
    scores = score_features(lm, tok, s, prompt=text, amplification=amplification,
                            batch_size=batch_size, features=features)
    path = scores.save(folder)
    pages = folder / "pages"
    if (pages / "index.html").is_file():
        st = FeatureStore.load(folder)
        done = sorted(int(p.stem) for p in (pages / "features").glob("*.html") if p.stem.isdigit())
        write_pages(st, pages, done or None, max_pages=len(done) or 1000, scores=scores)
    best = scores.top(top)
    rows = [{"feature": i, "label": s.labels.get(i), **(scores.get(i) or {})} for i in best]
    if as_json:
        echo_json({"sae": s.name, "file": str(path), "definitions": DEFINITIONS,
                   "meta": scores.meta, "top": rows})
        return
    typer.echo(f"scores written to {path}")
    typer.echo(f"output score: {DEFINITIONS['output_score']}")
    typer.echo(f"delta token confidence: {DEFINITIONS['delta_token_confidence']}")
    if rows:
        score_table(f"top {len(rows)} features of {s.name} by output score", rows)


def score_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Features with their scores (``FeatureScores.get`` rows plus ``feature`` and ``label``;
    a ``frequency`` column when the rows carry one)."""
    freq = bool(rows) and "frequency" in rows[0]
    table(title, ["feature", "output score", "delta token conf.",
                  *(["frequency"] if freq else []), "label"],
          [[r["feature"], f"{r['output_score']:.3g}", f"{r['delta_token_confidence']:+.3g}",
            *([f"{100 * r['frequency']:.3g}%" + (" dense" if r["dense"] else "")] if freq else []),
            r["label"] or ""] for r in rows])


@app.command("eval-steer")
@command
def eval_steer_cmd(
        sae: SaeOpt,
        feature: Annotated[list[int], typer.Option("--feature", "-f", help="Feature to evaluate; repeat for several.")],
        mode: Annotated[str, typer.Option(help="add (strength = length of the added vector), clamp (set the activation to the strength) or scale (multiply it by the strength).")] = "add",
        strengths: Annotated[str, typer.Option(help="Comma-separated strengths to sweep.")] = "0,10,20,40,80,160",
        prompts: Annotated[Path | None, typer.Option("--prompts", help="A text file, one held-out prompt per line (at least 2). [default: 16 built-in neutral prompts, or with --chat 16 neutral instructions]", show_default=False)] = None,
        chat: Annotated[bool, typer.Option("--chat", help="Each prompt is a user message in the chat template; the assistant's reply is scored (instruct models).")] = False,
        concept: Annotated[str | None, typer.Option("--concept", help="Concept text: its log-probability lift is the concept score, the prompt baseline asks for it, DiffMean contrasts it with neutral text. [default: the feature's top logit-lens tokens]", show_default=False)] = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=1024, help="Tokens generated per prompt.")] = 32,
        baselines: Annotated[bool, typer.Option(help="Also run the prompt and DiffMean baselines.")] = True,
        fluency_limit: Annotated[float, typer.Option(min=1.0, help="A strength is eligible when its perplexity is at most this times the unsteered one.")] = 2.0,
        diversity_limit: Annotated[float, typer.Option(min=0.0, max=1.0, help="...and its distinct-2 (different token bigrams / bigrams) at least this times the unsteered one: perplexity alone does not see degenerate repetition.")] = 0.5,
        plot: Annotated[Path | None, typer.Option("--plot", help="Folder for one PNG per feature (concept and fluency against strength; needs matplotlib).", show_default=False)] = None,
        judge: Annotated[str | None, typer.Option("--judge", help="OpenAI-compatible chat endpoint (base URL) that scores each continuation with the AxBench rubric.", show_default=False)] = None,
        judge_model: Annotated[str | None, typer.Option("--judge-model", help="Model name for --judge.", show_default=False)] = None,
        judge_key_env: Annotated[str | None, typer.Option("--judge-key-env", help="Environment variable holding the judge's API key.", show_default=False)] = None,
        judge_concurrency: Annotated[int, typer.Option(min=1, max=64, help="Judge requests in flight at once.")] = 4,
        export_lm_eval: Annotated[Path | None, typer.Option("--export-lm-eval", help="Write the chosen add edit of the first feature as an lm-eval `steered` .pt file.", show_default=False)] = None,
        export_serve: Annotated[Path | None, typer.Option("--export-serve", help="Write the chosen edit of the first feature as a `llamascope serve` request body (JSON).", show_default=False)] = None,
        model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
        revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Does steering with a feature work? Sweep strengths on held-out prompts and report, per
    strength: concept (the feature's re-encoded activation, a concept log-probability lift),
    fluency (perplexity under the unsteered model) and side effects on neutral text (KL, loss
    change), beside a prompt baseline and DiffMean. The strength is chosen on half of the
    prompts; the scores shown are the other half's."""
    import math

    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.evaluation.steer_eval import MODES, eval_steer

    if mode not in MODES:
        raise typer.BadParameter(f"{mode!r}: allowed are {', '.join(MODES)}", param_hint="--mode")
    try:
        values = [float(x) for x in strengths.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{strengths!r} is not a comma-separated list of numbers",
                                 param_hint="--strengths") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise typer.BadParameter("give finite numbers, e.g. 0,10,20,40", param_hint="--strengths")
    texts = None
    if prompts is not None:
        if not prompts.is_file():
            raise InputError(f"--prompts {prompts}: no such file", hint="one prompt per line")
        texts = [ln.strip() for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()]
        if len(texts) < 2:
            raise InputError(f"--prompts {prompts} holds {len(texts)} prompt(s); give at least 2 "
                             "(half choose the strength, half report the scores)")
    if concept is not None:
        check_text(concept, "--concept")
    if (judge is None) != (judge_model is None):
        raise typer.BadParameter("--judge and --judge-model go together", param_hint="--judge")
    if export_lm_eval is not None and mode != "add":
        raise InputError(f"--export-lm-eval exports add edits only, not {mode}: lm-eval's "
                         "'clamp' sets a direction's projection, not an SAE feature's activation",
                         hint="use --mode add, or --export-serve")
    judge_fn = None
    if judge is not None:
        from llamascope_sdk.evaluation.judge import make_judge

        judge_fn = make_judge(judge, str(judge_model), key_env=judge_key_env,
                              concurrency=judge_concurrency)
    s, lm, tok = load_sae_and_model(sae, model, device, dtype, revision)
    for f in feature:
        s.check_features(f)
    results = eval_steer(lm, tok, s, feature, strengths=values, mode=mode, prompts=texts,
                         concept=concept, max_new_tokens=max_new_tokens, baselines=baselines,
                         fluency_limit=fluency_limit, diversity_limit=diversity_limit,
                         chat=chat, judge=judge_fn)
    written = {}
    if plot is not None:
        from llamascope_sdk.evaluation.steer_plot import plot_sweep

        for r in results:
            written[r.feature] = str(plot_sweep(r, plot / f"eval_steer_{s.name}_{r.feature}.png"))
    exports = _exports(s, results[0], mode, export_lm_eval, export_serve, sae)
    if as_json:
        echo_json({"sae": s.name, "mode": mode, "chat": chat, "strengths": values,
                   "judge": getattr(judge_fn, "report", lambda: None)(),
                   "features": [r.to_dict() for r in results], "plots": written,
                   "exports": exports})
        return
    for r in results:
        _print_feature(s.name, mode, r)
        if r.feature in written:
            typer.echo(f"plot: {written[r.feature]}")
    for what, path in exports.items():
        typer.echo(f"{what}: {path}")
    if judge_fn is not None:
        typer.echo(f"judge: {judge_fn.report()}")


def _fmt(v: float | None, spec: str = ".3g") -> str:
    import math

    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _print_feature(sae_name: str, mode: str, r: Any) -> None:
    rows = []
    for m, pts in r.curves.items():
        if m == "none":
            continue
        for p in pts:
            mark = "  <- chosen" if r.chosen.get(m) is p else ""
            rows.append([m, _fmt(p.strength, "g") if p.strength is not None else "-",
                         _fmt(p.concept_activation), _fmt(p.concept_lift, "+.3f"),
                         _fmt(p.perplexity, ".2f"), _fmt(p.distinct, ".2f"), _fmt(p.kl),
                         _fmt(p.dloss, "+.3g"),
                         _fmt(p.judge, ".2f") + mark])
    label = f" '{r.label}'" if r.label else ""
    table(f"{sae_name} feature {r.feature}{label}, mode {mode}: test-half scores "
          f"(strength chosen on the other half); concept lift = {r.concept_measure}",
          ["method", "strength", "feature act.", "concept lift", "perplexity", "distinct-2", "KL",
           "d loss", "judge"], rows)


def _exports(s: Any, r: Any, mode: str, lm_eval_path: Path | None, serve_path: Path | None,
             spec: str) -> dict[str, str]:
    out: dict[str, str] = {}
    if lm_eval_path is None and serve_path is None:
        return out
    from llamascope_sdk.steering.interventions import Clamp, Scale, Steer
    from llamascope_sdk.steering.lm_eval_export import save_lm_eval_steer, save_serve_request

    strength = r.chosen["feature"].strength or 0.0
    edit = {"add": Steer, "clamp": Clamp, "scale": Scale}[mode](s, [r.feature], strength)
    if lm_eval_path is not None:
        out["lm-eval steer file"] = str(save_lm_eval_steer([edit], lm_eval_path))
    if serve_path is not None:
        out["serve request body"] = str(save_serve_request(edit, serve_path, sae_spec=spec))
    return out
