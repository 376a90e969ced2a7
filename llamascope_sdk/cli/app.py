"""The typer application, the options commands share, and how errors and output are printed.

Each command module parses its options, calls one library function and prints. Heavy imports
(torch, transformers) happen inside the commands, so ``llamascope --help`` stays fast. A user
error prints one line plus a hint and exits 1; ``llamascope --debug ...`` shows the traceback.
Only an exception the SDK does not expect is called a bug.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="llamascope", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: reads well at 80 columns, [default: ...] shown as text
    context_settings={"max_content_width": 80, "help_option_names": ["-h", "--help"]},
    help="Load, inspect, steer and evaluate the Llama Scope SAEs (and the bundled SmolLM2 demo "
         "SAE). Every command takes --help.")

SaeOpt = Annotated[str, typer.Option(
    "--sae", "-s", help="SAE: a Llama Scope name (L12M-32x, l12m_32x, ...), a local folder, or "
                        "'demo'.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="Hub id, local folder, or 'smollm2-135m'. [default: the SAE's base "
                          "model from its lm_config.json]", show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", help="Model dtype: float32, bfloat16 or float16. [default: float32 on CPU, "
                    "bfloat16 on GPU]", show_default=False)]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", help="Hub branch, tag or commit of the SAE to pin. [default: main]",
    show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print strict JSON instead of a table.")]
PromptOpt = Annotated[str | None, typer.Option(
    "--prompt", "-p", help="Text to run. [default: the demo prompt, for the demo SAE only]",
    show_default=False)]
FeatureOpt = Annotated[list[int] | None, typer.Option(
    "--feature", "-f", help="Feature index; repeat for several. [default: 1297 for the demo]",
    show_default=False)]
TokensOpt = Annotated[int, typer.Option(
    "--max-new-tokens", "-n", min=1, max=4096,
    help="Tokens to generate (prompt + these must fit the model's window).")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", help="Sample with this seed. [default: greedy decoding]", show_default=False)]
PositionsOpt = Annotated[str | None, typer.Option(
    "--positions", help="all | prompt | generated. [default: generated with --chat, else all]",
    show_default=False)]


@dataclass
class _Options:
    """Options of the root command, kept on typer's context (``ctx.obj``)."""

    debug: bool = False


@app.callback()
def _root(ctx: typer.Context,
          debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False) -> None:
    ctx.obj = _Options(debug=debug)


def command(fn: Callable[..., None]) -> Callable[..., None]:
    """Make ``fn`` a command whose errors print one line plus a hint (exit 1), or the full
    traceback under ``llamascope --debug``. Register it with ``@app.command()`` on top."""

    @functools.wraps(fn)
    def run(ctx: typer.Context, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            root = ctx.find_root().obj
            if isinstance(root, _Options) and root.debug:
                raise
            raise typer.Exit(report_error(exc)) from None

    # typer reads the signature: add the context parameter in front of fn's own, with the
    # annotations resolved in fn's module (they are strings under postponed evaluation).
    hints = typing.get_type_hints(fn, include_extras=True)
    params = [p.replace(annotation=hints.get(p.name, p.annotation))
              for p in inspect.signature(fn).parameters.values()]
    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  annotation=typer.Context)
    run.__signature__ = inspect.Signature([ctx_param, *params], return_annotation=None)  # type: ignore[attr-defined]
    run.__annotations__ = {"ctx": typer.Context, **hints}
    del run.__wrapped__  # else typer reads fn's own signature
    return run


def report_error(exc: BaseException) -> int:
    """Print one readable line (plus a hint) for ``exc`` on stderr; return the exit code."""
    from llamascope_sdk.base.errors import LlamascopeError

    hint = getattr(exc, "hint", None)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, LlamascopeError):
        say(f"error: {text}", err=True)
    elif (isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__
          or (isinstance(exc, RuntimeError) and "allocate" in text and "memory" in text)):
        # torch's CPU allocator raises a RuntimeError ("can't allocate memory: you tried to
        # allocate N bytes"): the size the user asked for, not a bug.
        say(f"error: out of memory: {text}", err=True)
        hint = hint or "lower --batch-size, --top-n or --tokens, or use a machine with more memory"
    elif isinstance(exc, (ValueError, LookupError, OSError, TypeError)):
        # Raised by the library on bad arguments (pydantic, torch, transformers): the user's.
        say(f"error: {text}", err=True)
    else:
        say(f"error: {type(exc).__name__}: {text}", err=True)
        hint = hint or "this looks like a bug; rerun as `llamascope --debug ...` for the traceback"
    if hint:
        say(f"hint: {hint}", err=True)
    return 1


def say(text: str, *, err: bool = False) -> None:
    """Print one line with control characters made visible (labels, tokens and paths may hold
    escape sequences: see :mod:`llamascope_sdk.base.terminal`)."""
    from llamascope_sdk.base.terminal import visible

    typer.echo(visible(text), err=err)


def echo_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON: NaN or inf is an error, never written as ``NaN``."""
    typer.echo(json.dumps(obj, indent=2, default=str, allow_nan=False))


def table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    """Print a table. Cells are plain text (no rich markup) with control characters made
    visible; newlines and tabs inside a cell are kept."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from llamascope_sdk.base.terminal import visible

    t = Table(title=None if title is None else Text(visible(title)), show_lines=False)
    for c in columns:
        t.add_column(Text(visible(c)), overflow="fold")
    for r in rows:
        t.add_row(*[Text(visible(str(v), keep_lines=True)) for v in r])
    Console().print(t)


def check_text(text: str, option: str = "--prompt") -> str:
    """Refuse empty text and text that is not valid UTF-8 (one line, naming the option)."""
    from llamascope_sdk.base.errors import InputError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{option} is not valid UTF-8 text",
                         hint="pass text in UTF-8 (check the terminal's or file's encoding)") from None
    if not text.strip():
        raise InputError(f"{option} is empty", hint=f"give some text, e.g. {option} 'The city of'")
    return text


def load_sae_and_model(sae_name: str, model: str | None, device: str, dtype: str | None,
                       revision: str | None, gate: str = "reference") -> tuple[Any, Any, Any]:
    """Load the SAE and the model it belongs to (by default the base model its lm_config.json
    names); check that they fit together."""
    from llamascope_sdk.base.devices import resolve_device
    from llamascope_sdk.loading.compat import check_compatible
    from llamascope_sdk.loading.models import base_model_of, load_model
    from llamascope_sdk.loading.sae import SAE

    resolve_device(device)  # a missing GPU is reported before any download
    sae = SAE.from_pretrained(sae_name, revision=revision, device=device, gate=gate)  # type: ignore[arg-type]
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise here
    lm, tok = load_model(model or base_model_of(sae), device=device, dtype=dtype,
                         hidden_size=sae.d_model)
    check_compatible(lm, sae)
    return sae, lm, tok


def run_script(fn: Callable[[], None]) -> int:
    """Run a script's ``main`` the way the CLI runs a command: a user error prints one line plus
    a hint on stderr and returns 1 (the traceback with LLAMASCOPE_DEBUG=1). For examples/."""
    import os

    try:
        fn()
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("LLAMASCOPE_DEBUG"):
            raise
        return report_error(exc)
    return 0


def main() -> None:
    """Console entry point (``llamascope``)."""
    app()


def score_table(title: str, rows: list[dict[str, Any]]) -> None:
    """Features with their scores (``FeatureScores.get`` rows plus ``feature`` and ``label``;
    a ``frequency`` column when the rows carry one)."""
    freq = bool(rows) and "frequency" in rows[0]
    table(title, ["feature", "output score", "delta token conf.",
                  *(["frequency"] if freq else []), "label"],
          [[r["feature"], f"{r['output_score']:.3g}", f"{r['delta_token_confidence']:+.3g}",
            *([f"{100 * r['frequency']:.3g}%" + (" dense" if r["dense"] else "")] if freq else []),
            r["label"] or ""] for r in rows])
