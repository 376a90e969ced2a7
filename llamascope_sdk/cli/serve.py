"""``llamascope serve``: the steered model behind an OpenAI-compatible HTTP API."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from llamascope_sdk.cli.app import DeviceOpt, DtypeOpt, ModelOpt, app, command


@app.command()
@command
def serve(model: ModelOpt = None,
          sae: Annotated[list[str] | None, typer.Option(
              "--sae", "-s", help="SAE to load at startup (repeat for several); requests may "
              "also name any Llama Scope SAE or 'demo', loaded on first use.")] = None,
          host: Annotated[str, typer.Option(help="Address to listen on; other than 127.0.0.1 only with care (use --api-key).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
          api_key: Annotated[str | None, typer.Option(
              "--api-key", envvar="LLAMASCOPE_API_KEY", show_default=False,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")] = None,
          sae_memory: Annotated[str, typer.Option("--sae-memory", help="Byte budget for loaded SAEs (LRU eviction), e.g. 512MB, 8GB.")] = "8GB",
          max_batch: Annotated[int, typer.Option(min=2, help="Rows generated together at most.")] = 16,
          max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting at most; more get 429.")] = 64,
          max_edits: Annotated[int, typer.Option(min=0, help="Edits per request at most.")] = 16,
          max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens a request may ask for at most.")] = 1024,
          allow_local_saes: Annotated[bool, typer.Option(help="Let requests name local SAE folders (otherwise only those given with --sae).")] = False,
          device: DeviceOpt = "cpu", dtype: DtypeOpt = None) -> None:
    """Serve the model with per-request feature steering (OpenAI-compatible API)."""
    try:
        from llamascope_sdk.serve import Limits, ServeConfig, create_app, run
    except ImportError as exc:
        raise typer.BadParameter(f"the server needs the serve extra ({exc.name} is missing): "
                                 "pip install 'llamascope-sdk[serve]'") from None
    from llamascope_sdk.loading.compat import check_compatible
    from llamascope_sdk.loading.models import base_model_of, load_model
    from llamascope_sdk.steering.pool import SaePool, parse_bytes

    names = list(sae or [])
    pool = SaePool(parse_bytes(sae_memory), device=device)
    first = pool.get(names[0]) if names else None
    if model is None and first is None:
        raise typer.BadParameter("give --model (e.g. smollm2-135m) or an --sae whose base "
                                 "model it is", param_hint="--model")
    model_id = model or base_model_of(first)
    lm, tok = load_model(model_id, device=device, dtype=dtype)
    for n in names:
        check_compatible(lm, pool.get(n), n)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it "
                   "can use it", err=True)
    config = ServeConfig(model_id=model_id, api_key=api_key or None,
                         limits=Limits(max_edits=max_edits, max_tokens=max_tokens,
                                       default_max_tokens=min(128, max_tokens)),
                         served_saes=tuple(names), allow_local_saes=allow_local_saes,
                         max_batch=max_batch, max_queue=max_queue)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run(create_app(lm, tok, pool, config), host, port)
