"""Reading features: ``encode`` shows the top features of every token of a prompt."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import (
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
    table,
)


@app.command()
@command
def encode(sae: SaeOpt, prompt: PromptOpt = None, model: ModelOpt = None,
           top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Features per token.")] = 5,
           include_special: Annotated[bool, typer.Option(help="Also read BOS/EOS/pad positions.")] = False,
           device: DeviceOpt = "cpu", dtype: DtypeOpt = None, revision: RevisionOpt = None,
           gate: Annotated[str, typer.Option(help="reference (the authors' gate) or saelens (to compare with SAELens/Neuronpedia).")] = "reference",
           as_json: JsonOpt = False) -> None:
    """Show the top features of every token of a prompt.

    Features that fire on more than 50% of tokens (from the SAE's statistics, when it has
    them) are marked 'dense': they say little about this prompt.
    """
    from llamascope_sdk import demo
    from llamascope_sdk.reading import encode_report, read_features

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
        tag = " dense" if freq is not None and float(freq[f]) > 0.5 else ""
        label = f" '{s.labels[f]}'" if f in s.labels else ""
        return f"{f} ({v:.2f}{tag}){label}"

    top = reading.top[s.name]
    rows = [[i, repr(t), ", ".join(cell(f, v) for f, v in top[i]) or "-"]
            for i, t in enumerate(reading.tokens)]
    table(f"top {top_k} features of {s.name} (activation; 'dense' = fires on >50% of tokens)",
          ["pos", "token", "feature (activation)"], rows)
