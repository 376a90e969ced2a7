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
    score_table,
    table,
)


def _store_folder(store: str | None, sae_name: str) -> Any:
    """The store to write into: ``--store``, else the SAE's store in the default location;
    it must be a complete store (mined by ``llamascope inspect``) in a folder we can write."""
    from llamascope_sdk.store.feature_store import FeatureStore, default_store_dir
    from llamascope_sdk.store.files import check_output_folder

    folder = Path(store).expanduser() if store else default_store_dir(sae_name)
    st = FeatureStore.load(folder)  # refuses a folder that is not a complete store, with a hint
    check_output_folder(folder)
    return st


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
    from llamascope_sdk.store.ownership import inside
    from llamascope_sdk.store.pages import rewrite_pages
    from llamascope_sdk.store.scores import DEFINITIONS, OUTPUT_SCORE_PROMPT, score_features

    text = check_text(prompt) if prompt is not None else OUTPUT_SCORE_PROMPT
    if store is not None:
        _store_folder(store, sae)  # a bad --store is reported before anything loads
    s, lm, tok = load_sae_and_model(sae, model, device, dtype, revision)
    st = _store_folder(store, s.name).check_sae(s)  # another SAE's store: refused before work
    for f in features or []:
        s.check_features(f)
    scores = score_features(lm, tok, s, prompt=text, amplification=amplification,
                            batch_size=batch_size, features=features)
    path = scores.save(st.path)
    if not rewrite_pages(st.path, scores) and not inside(st.path, st.path / "pages"):
        typer.echo(f"pages not updated: {st.path / 'pages'} is a link out of the store", err=True)
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


@app.command("eval-steer")
@command
def eval_steer_cmd(
        sae: SaeOpt,
        feature: Annotated[list[int], typer.Option("--feature", "-f", help="Feature to evaluate; repeat for several.")],
        mode: Annotated[str, typer.Option(help="add (strength = length of the added vector), clamp (set the activation to the strength) or scale (multiply it by the strength).")] = "add",
        strengths: Annotated[str, typer.Option(help="Comma-separated strengths to sweep.")] = "0,10,20,40,80,160",
        prompts: Annotated[Path | None, typer.Option("--prompts", help="A text file, one held-out prompt per line (at least 2). [default: 16 built-in neutral prompts, or with --chat 16 neutral instructions]", show_default=False)] = None,
        chat: Annotated[bool, typer.Option("--chat", help="Each prompt is a user message in the chat template; the assistant's reply is scored (instruct models).")] = False,
        concept: Annotated[str | None, typer.Option("--concept", help="Concept text: its log-probability lift is the concept score, the prompt baseline asks for it, DiffMean contrasts it with neutral text. [default: the feature's explanation (explain) or label, else the tokens that most raise it in its top examples]", show_default=False)] = None,
        store: Annotated[str | None, typer.Option("--store", help="Feature store whose explanations, labels and top examples give the concept. [default: the SAE's store in the default location, if there is one]", show_default=False)] = None,
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
        when_feature: Annotated[int | None, typer.Option("--when-feature", help="Conditional steering: apply the edit only where this feature of the same SAE is above --when-above; the report adds where it fired and the side effects on prompts where it never did.", show_default=False)] = None,
        when_above: Annotated[float, typer.Option("--when-above", help="Threshold of --when-feature (model units).")] = 0.0,
        when_latch: Annotated[bool, typer.Option("--when-latch", help="Once the condition held, keep the edit on for the rest of the sequence.")] = False,
        export_serve: Annotated[Path | None, typer.Option("--export-serve", help="Write the chosen edit of the first feature as a `llamascope serve` request body (JSON).", show_default=False)] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the results (the --json report) to this new .json file; with --judge the results without the judge are written there first, and kept should the judge fail. [default with --judge: a new file under $LLAMASCOPE_CACHE/eval-steer]", show_default=False)] = None,
        model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
        revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Does steering with a feature work? Sweep strengths on held-out prompts and report, per
    strength: concept (the feature's re-encoded activation, a concept log-probability lift),
    fluency (perplexity under the unsteered model) and side effects on neutral text (KL, loss
    change), beside a prompt baseline and DiffMean. The strength is chosen on half of the
    prompts; the scores shown are the other half's."""
    from llamascope_sdk.evaluation.steer_eval import eval_steer

    values, texts = _check_inputs(mode, strengths, prompts, concept, judge, judge_model,
                                  export_lm_eval, when_feature)
    check_outputs(plot, export_lm_eval, export_serve, out)  # before any model work
    judge_fn = None
    if judge is not None:
        from llamascope_sdk.evaluation.judge import make_judge

        judge_fn = make_judge(judge, str(judge_model), key_env=judge_key_env,
                              concurrency=judge_concurrency)
        judge_fn.probe()  # a judge that is down fails now, not after the sweep
    s, lm, tok = load_sae_and_model(sae, model, device, dtype, revision)
    for f in feature:
        s.check_features(f)
    when = None
    if when_feature is not None:
        from llamascope_sdk.steering.conditions import FeatureCondition

        when = FeatureCondition(s, when_feature, when_above, latch=when_latch)
    st = concept_store(store, s)
    if judge_fn is not None and out is None:
        out = _default_out(s.name, feature)
    report = {"sae": s.name, "mode": mode, "chat": chat, "strengths": values}
    results = _sweep(out, report, lambda keep: eval_steer(
        lm, tok, s, feature, strengths=values, mode=mode, prompts=texts, concept=concept,
        max_new_tokens=max_new_tokens, baselines=baselines, fluency_limit=fluency_limit,
        diversity_limit=diversity_limit, chat=chat, judge=judge_fn, on_llm_free=keep, store=st,
        when=when))
    written = {}
    if plot is not None:
        from llamascope_sdk.evaluation.steer_plot import plot_sweep

        for r in results:
            written[r.feature] = str(plot_sweep(r, plot / f"eval_steer_{s.name}_{r.feature}.png"))
    exports = _exports(s, results[0], mode, export_lm_eval, export_serve, sae, when)
    report |= {"judge": getattr(judge_fn, "report", lambda: None)(),
               "features": [r.to_dict() for r in results], "plots": written, "exports": exports}
    if out is not None:
        _write_report(out, report)
    if as_json:
        echo_json(report)
        return
    _print_results(s.name, mode, results, when, written, exports, judge_fn)


def _check_inputs(mode: str, strengths: str, prompts: Path | None, concept: str | None,
                  judge: str | None, judge_model: str | None, export_lm_eval: Path | None,
                  when_feature: int | None) -> tuple[list[float], list[str] | None]:
    """The strengths and prompts of ``eval-steer``, every option checked (one line each)."""
    import math

    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.evaluation.steer_eval import MODES

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
    from llamascope_sdk.steering.spec import MODES as TABLE

    if export_lm_eval is not None and when_feature is not None:
        raise InputError("--export-lm-eval with --when-feature: lm-eval's steered model adds "
                         "at every position and has no conditions", hint="use --export-serve")
    if export_lm_eval is not None and TABLE[mode].lm_eval_action is None:
        raise InputError(f"--export-lm-eval exports add edits only, not {mode}: lm-eval's "
                         "'clamp' sets a direction's projection, not an SAE feature's activation",
                         hint="use --mode add, or --export-serve")
    return values, texts


def _print_results(name: str, mode: str, results: list[Any], when: Any, written: dict[int, str],
                   exports: dict[str, str], judge_fn: Any) -> None:
    """The text report of ``eval-steer``: each feature's table, condition, plot and exports."""
    for r in results:
        _print_feature(name, mode, r)
        if r.condition is not None and when is not None:
            _print_condition(when.describe(), r.condition)
        for line in r.no_choice.values():
            typer.echo(line)
        if r.feature in written:
            typer.echo(f"plot: {written[r.feature]}")
    for what, path in exports.items():
        typer.echo(f"{what}: {path}")
    if judge_fn is not None:
        typer.echo(f"judge: {judge_fn.report()}")


def _print_condition(what: str, rows: list[dict[str, Any]]) -> None:
    table(f"condition: {what} (test half; 'quiet' = prompts where it never fired)",
          ["strength", "fired on", "quiet prompts", "quiet unchanged", "quiet d log ppl"],
          [[_fmt(r["strength"], "g"), f"{100 * r['fired']:.0f}%", r["quiet_prompts"],
            "-" if r["quiet_unchanged"] is None else f"{100 * r['quiet_unchanged']:.0f}%",
            _fmt(r["quiet_dlog_perplexity"], "+.3g")] for r in rows])


def check_outputs(plot: Path | None, lm_eval_path: Path | None, serve_path: Path | None,
                  out: Path | None) -> None:
    """Every output path of ``eval-steer``, checked before any model work (one line each):
    export and result files are new (never overwritten) in a folder that can be written,
    ``--plot`` is a folder (created now) and matplotlib is installed."""
    import importlib.util

    from llamascope_sdk.base.errors import InputError, OutputPathError
    from llamascope_sdk.store.files import check_output_folder

    for option, path, suffixes in (("--export-lm-eval", lm_eval_path, (".pt", ".pth")),
                                   ("--export-serve", serve_path, ()),
                                   ("--out", out, (".json",))):
        if path is None:
            continue
        if path.exists() or path.is_symlink():
            raise OutputPathError(f"{option} {path} exists; choose a new file name (it is never "
                                  "overwritten)")
        if suffixes and path.suffix.lower() not in suffixes:
            raise InputError(f"{option} {path}: give a file name ending in "
                             f"{' or '.join(suffixes)}")
        check_output_folder(path.parent)
    if plot is not None:
        if plot.exists() and not plot.is_dir():
            raise OutputPathError(f"--plot {plot} is a file; give a folder (one PNG per feature "
                                  "is written into it)")
        if importlib.util.find_spec("matplotlib") is None:
            raise InputError("--plot needs matplotlib", hint="pip install 'llamascope-sdk[plot]'")
        check_output_folder(plot)
        plot.mkdir(parents=True, exist_ok=True)


def _default_out(sae_name: str, features: list[int]) -> Path:
    """Where a judged run keeps its results when no --out is given (a new file)."""
    import time

    from llamascope_sdk.base.paths import cache_root

    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{sae_name.replace('/', '_')}_f{features[0]}_{stamp}.json"
    return cache_root() / "eval-steer" / name


def _write_report(path: Path, report: dict[str, Any]) -> None:
    import json

    from llamascope_sdk.base.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=1, allow_nan=False) + "\n")


def _sweep(out: Path | None, report: dict[str, Any], run: Any) -> Any:
    """``run(keep)``: the sweep, ``keep`` writing the results without the judge to ``out``
    before the judge is asked; a judge failure then says where they are, in one line."""
    from llamascope_sdk.base.endpoint import EndpointError

    kept: list[Path] = []

    def keep(results: list[Any]) -> None:
        if out is not None:
            _write_report(out, {**report, "judge": "not run (these results are chosen by the "
                                "concept lift; the judge had not answered yet)",
                                "features": [r.to_dict() for r in results]})
            kept.append(out)
            typer.echo(f"results without the judge: {out}", err=True)

    try:
        return run(keep)
    except EndpointError as exc:
        if not kept:
            raise
        raise EndpointError(f"the judge failed ({exc}); the results without the judge are kept "
                            f"in {kept[0]}", hint="rerun when the judge is back, or without "
                            "--judge") from None


def concept_store(store: str | None, sae: Any) -> Any:
    """The store that gives features their concepts: ``--store``, else the SAE's store in the
    default location when there is one, else None."""
    from llamascope_sdk.store.feature_store import FeatureStore, default_store_dir

    folder = Path(store).expanduser() if store else default_store_dir(sae.name)
    if store is None and not (folder / "manifest.json").is_file():
        return None
    return FeatureStore.load(folder).check_sae(sae)


def _fmt(v: float | None, spec: str = ".3g") -> str:
    import math

    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _print_feature(sae_name: str, mode: str, r: Any) -> None:
    judged = r.headline == "judge"
    rows = []
    for m, pts in r.curves.items():
        if m == "none":
            continue
        for p in pts:
            mark = "  <- chosen" if r.chosen.get(m) is p else ""
            lift = [_fmt(p.concept_lift, "+.3f")]
            cells = [_fmt(p.judge, ".2f")] + lift if judged else lift
            rows.append([m, _fmt(p.strength, "g") if p.strength is not None else "-", *cells,
                         _fmt(p.concept_activation), _fmt(p.perplexity, ".2f"),
                         _fmt(p.distinct, ".2f"), _fmt(p.kl), _fmt(p.dloss, "+.3g"),
                         _fmt(p.lens_lift, "+.3f") + mark])
    label = f" '{r.label}'" if r.label else ""
    src = r.concept_source
    where = src.get("source", "") + (f": {src['detail']}" if src.get("detail") else "")
    table(f"{sae_name} feature {r.feature}{label}, mode {mode}: test-half scores (strength "
          f"chosen on the other half by {'the AxBench judge score' if judged else 'concept lift'}); "
          f"concept {r.concept!r} ({where}); {r.concept_measure}; perplexity: geometric mean "
          "over prompts; KL: mean over non-BOS positions",
          ["method", "strength", *(["judge (0-2)"] if judged else []), "concept lift",
           "feature act.", "perplexity", "distinct-2", "KL", "d loss", "lens lift"], rows)


def _exports(s: Any, r: Any, mode: str, lm_eval_path: Path | None, serve_path: Path | None,
             spec: str, when: Any = None) -> dict[str, str]:
    out: dict[str, str] = {}
    if lm_eval_path is None and serve_path is None:
        return out
    from llamascope_sdk.steering.lm_eval_export import save_lm_eval_steer, save_serve_request
    from llamascope_sdk.steering.spec import make_edit

    if "feature" not in r.chosen:  # no strength passed the limits: nothing to export
        return out
    strength = r.chosen["feature"].strength or 0.0
    edit = make_edit(mode, s, [r.feature], strength, when=when)
    if lm_eval_path is not None:
        out["lm-eval steer file"] = str(save_lm_eval_steer([edit], lm_eval_path))
    if serve_path is not None:
        out["serve request body"] = str(save_serve_request(edit, serve_path, sae_spec=spec))
    return out
