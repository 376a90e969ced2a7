"""``bench``: SAEBench's reliable metrics (core, sae-probes sparse probing, first-letter
absorption, autointerp) for one or several SAEs on one model, each with its reseed spread."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamascope_sdk.cli.app import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, app, command, echo_json


def _ints(text: str, option: str) -> tuple[int, ...]:
    from llamascope_sdk.base.errors import InputError

    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{option} {text!r}: give comma-separated whole numbers, e.g. 1,2,5") from None
    if not values:
        raise InputError(f"{option} is empty; give comma-separated whole numbers, e.g. 1,2,5")
    return values


@app.command("bench")
@command
def bench_cmd(
        sae: Annotated[list[str], typer.Option("--sae", "-s", help="SAE to benchmark; repeat for several (they share every model pass at a hook point). A Llama Scope name, a folder, or 'demo'.")],
        out: Annotated[Path, typer.Option(help="Results folder: SAEBench JSON per SAE, comparison.md, comparison.png, the activation cache.")],
        metrics: Annotated[str, typer.Option(help="Comma-separated: core, probing, absorption, autointerp.")] = "core,probing,absorption",
        seeds: Annotated[int, typer.Option(min=1, help="Reseeds per metric; every number is mean ± std over them.")] = 3,
        dataset: Annotated[list[str] | None, typer.Option(help="sae-probes dataset to probe; repeat for several. [default: all]", show_default=False)] = None,
        k: Annotated[str, typer.Option(help="k values of the sparse probes (SAEBench's sae-probes default 1,2,5).")] = "1,2,5",
        reg: Annotated[str, typer.Option(help="Penalty of the SAE probes: l1 (SAEBench) or l2.")] = "l1",
        text: Annotated[str | None, typer.Option(help="Text for core and autointerp: a .txt/.jsonl/.parquet file or a Hugging Face dataset. [default: the sae-probes prompts]", show_default=False)] = None,
        core_tokens: Annotated[int, typer.Option(min=128, help="Tokens per seed for the core metrics.")] = 8192,
        absorption_words: Annotated[int | None, typer.Option(min=26, help="Use this many words (drawn with seed 42) for absorption. [default: all]", show_default=False)] = None,
        autointerp_features: Annotated[int, typer.Option(min=1, help="Features explained and scored per seed.")] = 20,
        endpoint: Annotated[str | None, typer.Option(help="OpenAI-compatible base URL for autointerp, e.g. http://127.0.0.1:8000/v1.", show_default=False)] = None,
        endpoint_model: Annotated[str | None, typer.Option(help="Model name the endpoint serves.", show_default=False)] = None,
        api_key: Annotated[str | None, typer.Option(envvar="OPENAI_API_KEY", help="Bearer key for the endpoint [env OPENAI_API_KEY].", show_default=False)] = None,
        max_cache_gb: Annotated[float, typer.Option(help="Refuse a probing activation cache larger than this.")] = 50.0,
        model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
        as_json: JsonOpt = False) -> None:
    """Benchmark SAEs the way SAEBench does, with the noise stated (see docs/README_benchmark.md)."""
    from llamascope_sdk.base.devices import resolve_device
    from llamascope_sdk.benchmark.run import BenchSettings, benchmark, check_settings

    settings = BenchSettings(
        metrics=tuple(m.strip().lower() for m in metrics.split(",") if m.strip()),
        n_seeds=seeds, datasets=list(dataset) if dataset else None, ks=_ints(k, "--k"), reg=reg,
        core_tokens=core_tokens, text=text, absorption_words=absorption_words,
        autointerp_features=autointerp_features, endpoint=endpoint,
        endpoint_model=endpoint_model, api_key=api_key, max_cache_gb=max_cache_gb)
    check_settings(settings, out)  # one line on bad input, before anything loads
    resolve_device(device)
    run = benchmark(sae, out=out, model=model, device=device, dtype=dtype, settings=settings)
    if as_json:
        echo_json({n: [{"metric": o.metric, **{k2: s.as_dict() for k2, s in o.spreads.items()
                                               if k2 in o.headline}} for o in outs]
                   for n, outs in run.outputs.items()})
        return
    typer.echo(run.table)
    for f in run.files:
        typer.echo(f"wrote {f}")
