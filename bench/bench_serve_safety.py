"""What the server's safety and decoding changes cost, measured in one run (ratios, same process).

1. Reply decoding with stop strings: the whole reply decoded again at each token (main before
   issue 26.6) against :class:`~llamascope_sdk.serve.decoding.ReplyText` (incremental), for
   replies of 64, 256 and 1024 tokens of SmolLM2's tokenizer: milliseconds per reply, ratio.
2. The guard's cost per request: the same app with and without
   :class:`~llamascope_sdk.serve.security.Guard` answering ``GET /v1/models`` and a
   ``POST /v1/encode`` refused with 400, called in process (httpx's ASGI transport, no socket),
   alternated ``--rounds`` times; microseconds per request, ratio.

    PYTHONPATH=. python bench/bench_serve_safety.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamascope_sdk.serve import ServeConfig, create_app  # noqa: E402
from llamascope_sdk.serve.decoding import ReplyText  # noqa: E402
from llamascope_sdk.serve.payloads import first_stop  # noqa: E402
from llamascope_sdk.serve.security import Guard  # noqa: E402
from llamascope_sdk.steering.pool import SaePool  # noqa: E402
from tests.serve_tiny import smollm2_tokenizer, tiny_model  # noqa: E402

STOPS = ["\n\nUser:", "###"]  # never in the text: every token is searched


def whole_each_token(tok: Any, ids: list[int]) -> str:
    got: list[int] = []
    text = ""
    for t in ids:
        got.append(t)
        text = str(tok.decode(got, skip_special_tokens=True))
        if first_stop(text, STOPS) is not None:
            break
    return text


def incremental(tok: Any, ids: list[int]) -> str:
    reply = ReplyText(tok, STOPS)
    for i, t in enumerate(ids):
        reply.add(t, final=i == len(ids) - 1)
        if reply.stop_at is not None:
            break
    return reply.reply


def best_ms(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def bench_decoding(tok: Any, rounds: int) -> None:
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    all_ids = tok(text, add_special_tokens=False)["input_ids"]
    for n in (64, 256, 1024):
        ids = all_ids[:n]
        assert whole_each_token(tok, ids) == incremental(tok, ids)
        old = best_ms(lambda ids=ids: whole_each_token(tok, ids), rounds)
        new = best_ms(lambda ids=ids: incremental(tok, ids), rounds)
        print(f"decode a {n:4d}-token reply with stops: whole each token {old:8.1f} ms, "
              f"incremental {new:6.1f} ms ({old / new:5.1f}x faster)")


async def per_request_us(app: Any, n: int) -> float:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        t0 = time.perf_counter()
        for _ in range(n):
            assert (await client.get("/v1/models")).status_code == 200
            r = await client.post("/v1/encode", json={"sae": "demo", "text": ""})
            assert r.status_code == 400, r.text
        return (time.perf_counter() - t0) / (2 * n) * 1e6


def bench_guard(tok: Any, rounds: int, n: int = 300) -> None:
    guarded = create_app(tiny_model(len(tok)), tok, SaePool("1GB"), ServeConfig(model_id="m"))
    bare = create_app(tiny_model(len(tok)), tok, SaePool("1GB"), ServeConfig(model_id="m"))
    bare.user_middleware = [m for m in bare.user_middleware if m.cls is not Guard]
    with_guard, without = [], []
    for _ in range(rounds):
        with_guard.append(asyncio.run(per_request_us(guarded, n)))
        without.append(asyncio.run(per_request_us(bare, n)))
    g, b = min(with_guard), min(without)
    print(f"per request (GET /v1/models, POST /v1/encode -> 400): with the guard {g:6.0f} us, "
          f"without {b:6.0f} us ({g / b:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tok = smollm2_tokenizer()
    bench_decoding(tok, args.rounds)
    bench_guard(tok, args.rounds)


if __name__ == "__main__":
    main()
