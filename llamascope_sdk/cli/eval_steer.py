"""Does the steer work? ``score-features`` ranks every feature of an SAE by how well it is likely
to steer (output score, ΔToken Confidence) into its feature store; ``eval-steer`` sweeps
strengths and measures concept, fluency and side effects against baselines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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


def _store_folder(store: str | None, sae_name: str) -> Path:
    """The store to write into: ``--store``, else the SAE's store in the default location;
    it must be a complete store (mined by ``llamascope inspect``)."""
    from llamascope_sdk.feature_store import FeatureStore, default_store_dir

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
    from llamascope_sdk.feature_scores import DEFINITIONS, OUTPUT_SCORE_PROMPT, score_features
    from llamascope_sdk.feature_store import FeatureStore
    from llamascope_sdk.pages import write_pages

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
        table(f"top {len(rows)} features of {s.name} by output score",
              ["feature", "output score", "delta token conf.", "label"],
              [[r["feature"], f"{r['output_score']:.3g}", f"{r['delta_token_confidence']:+.3g}",
                r["label"] or ""] for r in rows])
