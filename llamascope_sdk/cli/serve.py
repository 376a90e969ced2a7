"""``llamascope serve``: the steered model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from llamascope_sdk.cli.app import DeviceOpt, DtypeOpt, ModelOpt, app, command

MAX_PROMPT_CHARS = 100_000  # as llamascope_sdk.serve.security (not imported: --help stays light)


ROW_COPIES = ("auto", "on", "off")
ROW_COPIES_AUTO_MAX = 2 * 2**30  # bytes: --row-copies auto copies a CPU model up to this

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_WILDCARD = ("0.0.0.0", "::", "")


@app.command()
@command
def serve(model: ModelOpt = None,
          sae: Annotated[list[str] | None, typer.Option(
              "--sae", "-s", help="SAE to load at startup (repeat for several). Requests may "
              "name these, and only these unless --allow-sae / --allow-sae-dir allow more.")] = None,
          host: Annotated[str, typer.Option(help="Address to listen on; other than 127.0.0.1 only with care (use --api-key).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
          api_key: Annotated[str | None, typer.Option(
              "--api-key", envvar="LLAMASCOPE_API_KEY", show_default=False,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (an empty key is refused).")] = None,
          sae_memory: Annotated[str, typer.Option("--sae-memory", help="Byte budget for loaded SAEs (LRU eviction), e.g. 512MB, 8GB.")] = "8GB",
          max_batch: Annotated[int, typer.Option(min=2, help="Rows generated together at most.")] = 16,
          max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting at most; more get 429.")] = 64,
          max_edits: Annotated[int, typer.Option(min=0, help="Edits per request, and features per edit, at most.")] = 16,
          max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens a request may ask for at most.")] = 1024,
          store: Annotated[list[str] | None, typer.Option(
              "--store", help="Feature store (folder, or an SAE name whose store is in the "
              "default place) whose mined activations give readouts their percentiles; repeat "
              "for several.", show_default=False)] = None,
          preset: Annotated[list[str] | None, typer.Option(
              "--preset", help="NAME=FILE.json: a steering list (the request field's JSON) "
              "served as the model MODEL:NAME, for clients that cannot send a steering field "
              "(lm-eval's loglikelihood requests); its SAEs are served. Repeat for several.")] = None,
          allow_sae: Annotated[list[str] | None, typer.Option(
              "--allow-sae", help="Pattern of further SAE names requests may use, loaded (and "
              "downloaded) on first use: 'L*R-8x', 'demo', 'myorg/*', '*' (repeatable).")] = None,
          allow_sae_dir: Annotated[list[str] | None, typer.Option(
              "--allow-sae-dir", help="Folder whose SAE sub-folders requests may name by "
              "absolute path (repeatable).")] = None,
          allowed_host: Annotated[list[str] | None, typer.Option(
              "--allowed-host", help="Host name clients may reach this server by, besides "
              "localhost, 127.0.0.1, ::1 and --host (repeatable).")] = None,
          max_body: Annotated[str, typer.Option("--max-body", help="Largest request body, e.g. 1MiB; larger ones get 413.")] = "1MiB",
          max_prompt_chars: Annotated[int, typer.Option(min=1, help="Largest prompt of one request in characters (token ids count one each); larger ones get 400 before tokenising.")] = MAX_PROMPT_CHARS,
          row_copies: Annotated[str, typer.Option(
              "--row-copies", help="auto, on or off: keep a column-major copy of every linear "
              "weight for decode steps of 1-3 rows on the CPU (MKL reads that layout up to 1.8x "
              "as fast; costs one more copy of the weights). auto: on for a CPU model whose "
              "copy is at most 2 GiB.")] = "auto",
          allow_local_saes: Annotated[bool, typer.Option(hidden=True)] = False,
          device: DeviceOpt = "cpu", dtype: DtypeOpt = None) -> None:
    """Serve the model with per-request feature steering (OpenAI-compatible API)."""
    try:
        from llamascope_sdk.serve import Limits, ServeConfig, create_app, run
        from llamascope_sdk.serve.security import SaeAllowList
    except ImportError as exc:
        raise typer.BadParameter(f"the server needs the serve extra ({exc.name} is missing): "
                                 "pip install 'llamascope-sdk[serve]'") from None
    from llamascope_sdk.steering.pool import SaePool, parse_bytes
    from llamascope_sdk.store.feature_store import resolve_store

    api_key = _checked(api_key, allow_local_saes, row_copies, device)
    for st in store or []:
        resolve_store(st)  # a bad --store is reported before anything loads
    limits = Limits(max_edits=max_edits, max_tokens=max_tokens,
                    default_max_tokens=min(128, max_tokens))
    presets = _presets(preset or [], limits)
    names = list(sae or [])
    served = names + _preset_saes(presets, names)  # requests may name these
    SaeAllowList.build(served, allow_sae or (), allow_sae_dir or ())  # folders checked now
    hosts = tuple(allowed_host or ()) + ((host,) if host not in _LOOPBACK + _WILDCARD else ())
    body_limit = parse_bytes(max_body)
    pool = SaePool(parse_bytes(sae_memory), device=device)
    lm, tok, model_id = _model(model, names, pool, device, dtype)
    _row_copies(lm, row_copies)
    _warn(host, api_key, hosts)
    config = ServeConfig(model_id=model_id, api_key=api_key, limits=limits,
                         served_saes=tuple(served), allow_saes=tuple(allow_sae or ()),
                         allow_sae_dirs=tuple(allow_sae_dir or ()), allowed_hosts=hosts,
                         max_batch=max_batch, max_queue=max_queue, max_body=body_limit,
                         max_prompt_chars=max_prompt_chars, stores=tuple(store or ()),
                         presets=presets)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(create_app(lm, tok, pool, config), host, port)


def _model(model: str | None, names: list[str], pool: Any, device: str,
           dtype: str | None) -> tuple[Any, Any, str]:
    """The model (given, or the base model of the first SAE), checked against every SAE."""
    from llamascope_sdk.loading.compat import check_compatible
    from llamascope_sdk.loading.models import base_model_of, load_model

    first = pool.get(names[0]) if names else None
    if model is None and first is None:
        raise typer.BadParameter("give --model (e.g. smollm2-135m) or an --sae whose base "
                                 "model it is", param_hint="--model")
    model_id = model or base_model_of(first)
    lm, tok = load_model(model_id, device=device, dtype=dtype)
    for n in names:
        check_compatible(lm, pool.get(n), n)
    return lm, tok, model_id


def _checked(api_key: str | None, allow_local_saes: bool, row_copies: str,
             device: str) -> str | None:
    """The API key (from LLAMASCOPE_API_KEY when not given), after the options checked
    before anything loads."""
    if allow_local_saes:
        raise typer.BadParameter("--allow-local-saes is gone: name the folders requests may "
                                 "use with --allow-sae-dir DIR", param_hint="--allow-local-saes")
    if row_copies not in ROW_COPIES:
        raise typer.BadParameter(f"{row_copies!r} is not one of {', '.join(ROW_COPIES)}",
                                 param_hint="--row-copies")
    if row_copies == "on" and device != "cpu":
        raise typer.BadParameter(f"row copies are for a model on the CPU, not {device}: drop "
                                 "--row-copies on or serve with --device cpu",
                                 param_hint="--row-copies")
    if api_key is None and "LLAMASCOPE_API_KEY" in os.environ:  # click drops an empty one
        api_key = os.environ["LLAMASCOPE_API_KEY"]
    if api_key is not None and not api_key.strip():
        raise typer.BadParameter("the API key is empty (--api-key or LLAMASCOPE_API_KEY): give "
                                 "a key, or leave both unset", param_hint="--api-key")
    return api_key


def _row_copies(lm: Any, mode: str) -> None:
    """Apply ``--row-copies`` (see llamascope_sdk.loading.row_copies)."""
    from llamascope_sdk.loading.row_copies import add_row_copies, row_copy_bytes

    on_cpu = next(lm.parameters()).device.type == "cpu"  # "on" off the CPU: refused in _checked
    if mode == "off" or (mode == "auto" and (not on_cpu or row_copy_bytes(lm) > ROW_COPIES_AUTO_MAX)):
        return
    added = add_row_copies(lm)
    typer.echo(f"row copies: {added / 2**20:,.0f} MiB more for decode steps of 1-3 rows "
               "(--row-copies off to save it)", err=True)


def _warn(host: str, api_key: str | None, hosts: tuple[str, ...]) -> None:
    if host not in _LOOPBACK and not api_key:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it "
                   "can use it", err=True)
    if host in _WILDCARD and not hosts:
        typer.echo(f"note: listening on {host or 'every address'}: clients that reach it by "
                   "another name than localhost need --allowed-host NAME", err=True)


def _preset_saes(presets: dict[str, list[Any]], names: list[str]) -> list[str]:
    """The SAEs the presets name (their edits' and conditions') that ``names`` lacks."""
    out: list[str] = []
    for edits in presets.values():
        for e in edits:
            when = e.get("when")
            for used in (e["sae"], when.get("sae") if isinstance(when, dict) else None):
                if isinstance(used, str) and used not in names and used not in out:
                    out.append(used)
    return out


def _presets(specs: list[str], limits: Any) -> dict[str, list[Any]]:
    """``NAME=FILE.json`` options: each file's steering list, checked as a request's would be."""
    import json
    from pathlib import Path

    from llamascope_sdk.serve.errors import HttpError
    from llamascope_sdk.serve.payloads import parse_steering_list

    out: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise typer.BadParameter(f"{spec!r}: give NAME=FILE.json (NAME of letters, digits, "
                                     "- and _)", param_hint="--preset")
        try:
            edits = json.loads(Path(file).expanduser().read_text())
            parse_steering_list(edits, chat=False, limits=limits)
        except (OSError, json.JSONDecodeError) as exc:
            raise typer.BadParameter(f"{file}: {exc}", param_hint="--preset") from None
        except HttpError as exc:
            raise typer.BadParameter(f"{file}: {exc.message}", param_hint="--preset") from None
        if not edits:
            raise typer.BadParameter(f"{file}: the steering list is empty", param_hint="--preset")
        out[name] = edits
    return out
