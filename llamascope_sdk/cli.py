"""The ``llamascope`` command line: a thin skin over the library.

Each command parses its options, calls one public function and prints. Heavy imports (torch,
transformers) happen inside the commands, so ``llamascope --help`` stays fast. Errors print
one line plus a hint and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="llamascope", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Load, inspect, steer and evaluate the Llama Scope SAEs (and the bundled SmolLM2 demo SAE).")

_STATE = {"debug": False}

SaeOpt = Annotated[str, typer.Option("--sae", "-s", help="SAE name (L12M-32x, l12m_32x, ...), local folder, or 'demo'.")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="HF id, local path, or 'smollm2-135m'. Default: the SAE's base model (Llama-3.1-8B; SmolLM2-135M for the demo SAE).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:1, mps ... (default cpu)")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit of the SAE to pin.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
PromptOpt = Annotated[str | None, typer.Option("--prompt", "-p", help="Text to run (default: the demo prompt for the demo SAE).")]
FeatureOpt = Annotated[list[int] | None, typer.Option("--feature", "-f", help="Feature index; repeat for several.")]
TokensOpt = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed; with it generation samples, without it greedy.")]
PositionsOpt = Annotated[str, typer.Option("--positions", help="all | prompt | generated")]


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    _STATE["debug"] = debug


def _command(fn: Callable[..., None]) -> Callable[..., None]:
    """Register ``fn`` as a command whose errors become one line plus a hint (exit 1)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if _STATE["debug"]:
                raise
            raise typer.Exit(report_error(exc)) from None

    return run


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(v) for v in r])
    Console().print(t)


def _load(sae_name: str, model: str | None, device: str | None, dtype: str | None,
          revision: str | None, gate: str = "reference") -> tuple[Any, Any, Any]:
    """Load the SAE and the model it belongs to; check they fit together."""
    from . import demo
    from .models import DEFAULT_MODEL, load_model
    from .sae import SAE

    sae = SAE.from_pretrained(sae_name, revision=revision, device=device, gate=gate)  # type: ignore[arg-type]
    if model is None:
        model = demo.DEMO_MODEL if demo.is_demo(sae_name) else DEFAULT_MODEL
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise here
    lm, tok = load_model(model, device=device, dtype=dtype)
    from .hooks import check_compatible

    check_compatible(lm, sae)
    return sae, lm, tok


def _features_and_prompt(sae_name: str, features: list[int] | None, prompt: str | None,
                         strength: float | None) -> tuple[list[int], str, float]:
    from pathlib import Path

    from . import demo
    from .registry import resolve

    if not demo.is_demo(sae_name) and not Path(sae_name).expanduser().is_dir():
        resolve(sae_name)  # an unknown name is the first thing to report
    if demo.is_demo(sae_name):
        features = features or [demo.DEMO_FEATURE.index]
        prompt = prompt or demo.DEMO_PROMPT
        strength = demo.DEMO_STRENGTH if strength is None else strength
    if not features:
        raise typer.BadParameter("give at least one --feature N", param_hint="--feature")
    if prompt is None:
        raise typer.BadParameter("give --prompt TEXT", param_hint="--prompt")
    if strength is None:
        raise typer.BadParameter(
            "give --strength S: raw model units (the length of the added vector; compare with "
            "the site's dataset norm from `llamascope info`) or, with --relative, multiples of "
            "the feature's typical activation", param_hint="--strength")
    return features, prompt, strength


@app.command("list")
@_command
def list_cmd(layer: Annotated[int | None, typer.Option(help="Only this layer (0-31).")] = None,
             position: Annotated[str | None, typer.Option(help="R, A, M or TC.")] = None,
             width: Annotated[str | None, typer.Option(help="8x/32k or 32x/128k.")] = None,
             as_json: JsonOpt = False) -> None:
    """List the 256 Llama Scope checkpoints (filterable)."""
    from .registry import list_saes

    refs = list_saes(layer=layer, position=position, width=width)
    if as_json:
        _echo_json([r.as_dict() for r in refs])
        return
    _table(f"{len(refs)} Llama Scope checkpoints", ["name", "repo", "folder", "hook in", "hook out", "d_sae"],
           [[r.name, r.repo_id(), r.subfolder(), r.hook_point_in, r.hook_point_out, r.d_sae] for r in refs])


@app.command()
@_command
def info(name: Annotated[str, typer.Argument(help="SAE name, local folder or 'demo'.")],
         revision: RevisionOpt = None, as_json: JsonOpt = False,
         offline: Annotated[bool, typer.Option(help="Only registry facts; no Hub request.")] = False) -> None:
    """Facts about one SAE: repo, folder, hook points, width, dataset norms, threshold, links."""
    from .info import sae_info

    facts = sae_info(name, revision=revision, fetch=not offline)
    if as_json:
        _echo_json(facts)
        return
    _table(facts.get("name", name), ["field", "value"], [[k, v] for k, v in facts.items() if k != "card"])


@app.command()
@_command
def download(names: Annotated[list[str], typer.Argument(help="One or more SAE names.")],
             revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Download SAEs into the Hugging Face cache (an interrupted download resumes)."""
    from .hub import download as fetch

    done = []
    for n in names:
        got = fetch(n, revision=revision)
        done.append({"name": n, "folder": str(got.folder), "commit": got.source.commit})
        if not as_json:
            typer.echo(f"{n}: {got.folder} (commit {got.source.commit})")
    if as_json:
        _echo_json(done)


@app.command()
@_command
def encode(sae: SaeOpt, prompt: PromptOpt = None, model: ModelOpt = None,
           top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Features per token.")] = 5,
           include_special: Annotated[bool, typer.Option(help="Also read BOS/EOS/pad positions.")] = False,
           device: DeviceOpt = None, dtype: DtypeOpt = None, revision: RevisionOpt = None,
           gate: Annotated[str, typer.Option(help="reference (the authors' gate) | saelens (SAELens's, to compare with SAELens/Neuronpedia)")] = "reference",
           as_json: JsonOpt = False) -> None:
    """Show the top features of every token of a prompt."""
    from . import demo
    from .reading import read_features

    prompt = prompt or (demo.DEMO_PROMPT if demo.is_demo(sae) else None)
    if prompt is None:
        raise typer.BadParameter("give --prompt TEXT", param_hint="--prompt")
    s, lm, tok = _load(sae, model, device, dtype, revision, gate)
    reading = read_features(lm, tok, s, prompt, top_k=top_k, include_special=include_special)
    if as_json:
        _echo_json(reading.to_dict())
        return
    top = reading.top[s.name]
    rows = [[i, repr(t), ", ".join(f"{f} ({v:.2f})" for f, v in top[i]) or "-"]
            for i, t in enumerate(reading.tokens)]
    _table(f"top {top_k} features of {s.name}", ["pos", "token", "feature (activation)"], rows)


def _generate(sae: str, features: list[int] | None, prompt: str | None, make: Any, strength: float | None,
              model: str | None, max_new_tokens: int, seed: int | None, device: str | None,
              dtype: str | None, revision: str | None, as_json: bool, title: str,
              caption: str | None = None) -> None:
    from .generation import compare_generations

    feats, text, value = _features_and_prompt(sae, features, prompt, strength)
    s, lm, tok = _load(sae, model, device, dtype, revision)
    s.check_features(feats)
    result = compare_generations(lm, tok, text, [make(s, feats, value)], max_new_tokens=max_new_tokens,
                                 seed=seed, do_sample=seed is not None)
    if as_json:
        _echo_json({**result.to_dict(), "sae": s.name, "features": feats, "value": value})
        return
    what = caption or f"{value:+g} x unit decoder direction"
    _table(f"{s.name}: features {feats} {what}", ["baseline", title],
           [[text + result.baseline, text + result.steered]])


@app.command()
@_command
def steer(sae: SaeOpt, feature: FeatureOpt = None,
          strength: Annotated[float | None, typer.Option("--strength", "-a", help="Added amount along each feature's unit direction.")] = None,
          relative: Annotated[bool, typer.Option(help="Strength in units of the feature's typical activation.")] = False,
          positions: PositionsOpt = "all", prompt: PromptOpt = None, model: ModelOpt = None,
          max_new_tokens: TokensOpt = 40, seed: SeedOpt = None, device: DeviceOpt = None,
          dtype: DtypeOpt = None, revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Generate with and without steering and show both side by side."""
    from .interventions import Steer

    def make(s: Any, feats: list[int], value: float) -> Any:
        return Steer(s, feats, value, positions=positions, relative=relative)

    _generate(sae, feature, prompt, make, strength, model, max_new_tokens, seed, device, dtype,
              revision, as_json, "steered")


@app.command()
@_command
def ablate(sae: SaeOpt, feature: FeatureOpt = None,
           mode: Annotated[str, typer.Option(help="zero | mean")] = "zero",
           positions: PositionsOpt = "all", prompt: PromptOpt = None, model: ModelOpt = None,
           max_new_tokens: TokensOpt = 40, seed: SeedOpt = None, device: DeviceOpt = None,
           dtype: DtypeOpt = None, revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Generate with and without ablating features and show both side by side."""
    from .interventions import Ablate

    def make(s: Any, feats: list[int], _value: float) -> Any:
        return Ablate(s, feats, mode=mode, positions=positions)

    _generate(sae, feature, prompt, make, 0.0, model, max_new_tokens, seed, device, dtype, revision,
              as_json, "ablated", caption=f"ablated ({mode})")


@app.command("eval")
@_command
def eval_cmd(names: Annotated[list[str], typer.Argument(help="SAE names sharing one model pass.")],
             dataset: Annotated[str, typer.Option(help="Local .txt/.jsonl/.parquet or HF dataset name.")],
             tokens: Annotated[int, typer.Option(min=1, help="Tokens to evaluate on.")] = 20_000,
             context: Annotated[int, typer.Option(min=2, help="Context length (up to 8192).")] = 1024,
             model: ModelOpt = None, device: DeviceOpt = None, dtype: DtypeOpt = None,
             revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """L0, explained variance, MSE, delta LM loss, KL and dead/dense features on a text."""
    from . import demo
    from .evaluation import evaluate
    from .hooks import check_compatible
    from .models import DEFAULT_MODEL, load_model
    from .sae import SAE

    saes = [SAE.from_pretrained(n, revision=revision, device=device) for n in names]
    model = model or (demo.DEMO_MODEL if all(demo.is_demo(n) for n in names) else DEFAULT_MODEL)
    lm, tok = load_model(model, device=device, dtype=dtype)
    for s in saes:
        check_compatible(lm, s)
    results = evaluate(lm, tok, saes, dataset, tokens=tokens, context=context, progress=not as_json)
    out = {name: r.to_dict() for name, r in results.items()}
    if as_json:
        _echo_json(out)
        return
    for name, r in out.items():
        _table(name, ["metric", "value"], [[k, v] for k, v in r.items() if not isinstance(v, (list, dict))])


@app.command()
@_command
def cards(out_dir: Annotated[str, typer.Argument(help="Folder to write one README.md per checkpoint into.")]) -> None:
    """Render the model card of every Llama Scope checkpoint."""
    from .cards import render_all

    paths = render_all(out_dir)
    typer.echo(f"wrote {len(paths)} cards under {out_dir}")


def main() -> None:
    """Console entry point (``llamascope``)."""
    app()


def report_error(exc: BaseException) -> int:
    """Print one readable line (plus a hint) for ``exc`` on stderr; return the exit code."""
    from .errors import LlamascopeError

    hint = getattr(exc, "hint", None)
    if isinstance(exc, LlamascopeError):
        typer.echo(f"error: {exc}", err=True)
    elif isinstance(exc, (ValueError, LookupError, OSError)):  # bad input or environment
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        typer.echo(f"error: {first}", err=True)
        hint = hint or "rerun as `llamascope --debug ...` for the traceback"
    else:
        first = str(exc).splitlines()[0] if str(exc) else ""
        typer.echo(f"error: {type(exc).__name__}: {first}", err=True)
        hint = hint or "this looks like a bug; rerun as `llamascope --debug ...` for the traceback"
    if hint:
        typer.echo(f"hint: {hint}", err=True)
    return 1


if __name__ == "__main__":
    main()
