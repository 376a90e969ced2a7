"""``POST /v1/encode``: which features of an SAE fire on which token of a text, as
``llamascope encode --json`` prints it (:func:`~llamascope_sdk.steering.reading.encode_report`).

Body: ``{"sae": NAME, "text": TEXT, "top_k": 5, "include_special": false}``. The forward runs on
the scheduler's thread, between generation steps, with the SAE held in the pool meanwhile; the
tokenising and the SAE's loading run on a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from llamascope_sdk.base.errors import SaeBudgetError
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.models import check_fits_window
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.serve.errors import HttpError, http_error
from llamascope_sdk.serve.steering import budget_error, fetch
from llamascope_sdk.steering.reading import encode_report, read_features

if TYPE_CHECKING:
    from llamascope_sdk.serve.app import Server


async def encode_request(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    """The answer of ``/v1/encode`` for a parsed body (its size already checked)."""
    name, text, top_k, special = _fields(body)
    server.names.check(name, "sae")  # before any look-up
    sae = await run_in_threadpool(_prepare, server, name, text)
    try:
        def run() -> dict[str, Any]:
            reading = read_features(server.model, server.tokenizer, sae, text, top_k=top_k,
                                    include_special=special)
            return {"sae": name, **encode_report(reading, sae)}

        return await asyncio.wrap_future(server.scheduler.call(run))
    except Exception as exc:
        raise http_error(exc, "text") from None
    finally:
        server.pool.release(sae)


def _fields(body: dict[str, Any]) -> tuple[str, str, int, bool]:
    name, text = body.get("sae"), body.get("text", body.get("prompt"))
    if not isinstance(name, str) or not name.strip():
        raise HttpError(400, "sae must be an SAE name (e.g. 'demo')", "sae")
    if not isinstance(text, str) or not text.strip():
        raise HttpError(400, "text must be a non-empty string", "text")
    top_k = body.get("top_k", 5)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise HttpError(400, f"top_k must be an integer in 1..100, got {top_k!r}", "top_k")
    special = body.get("include_special", False)
    if not isinstance(special, bool):
        raise HttpError(400, f"include_special must be true or false, got {special!r}",
                        "include_special")
    return name.strip(), text, top_k, special


def _prepare(server: Server, name: str, text: str) -> SAE:
    """Off the event loop: the text's length in tokens checked against the model's window,
    the SAE made available, taken from the pool and held, and checked against the model."""
    ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        check_fits_window(server.model, len(ids) + 1)
    except ValueError as exc:
        raise HttpError(400, f"text: {exc}", "text") from None
    fetch(server.pool, name, "sae")
    try:
        sae = server.pool.acquire(name)
    except Exception as exc:
        raise (budget_error(exc, "sae", server.pool, []) if isinstance(exc, SaeBudgetError)
               else http_error(exc, "sae")) from None
    try:
        check_compatible(server.model, sae)
    except Exception as exc:
        server.pool.release(sae)
        raise http_error(exc, "sae") from None
    return sae
