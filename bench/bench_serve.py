"""Throughput and latency of batched steering and of `llamascope serve`, measured in one run.

1. tokens/s of one batch of 8 rows with 8 distinct edits (add, clamp, scale, ablate on two
   SAEs at layers 15 and 5 of SmolLM2-135M) against the same batch with no edits (target
   >= 0.9x) and against the same 8 rows run one at a time;
2. p50/p95 latency of /v1/completions on a real server on 127.0.0.1 at 1, 4 and 16 concurrent
   clients (random edits per request).

Every row generates exactly --tokens tokens (no stop at EOS), greedy, fp32 on CPU. On a shared
machine the batch settings run interleaved, ``--rounds`` times each, and the fastest run counts.

    python bench/bench_serve.py [--tokens 32] [--requests 16]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamascope_sdk import SAE, Ablate, Clamp, Scale, Steer, load_model
from llamascope_sdk.loading import demo
from llamascope_sdk.steering.batch_generation import BatchGenerator, Row  # noqa: E402
from llamascope_sdk.steering.generation import prompt_ids  # noqa: E402

PROMPTS = [demo.DEMO_PROMPT, "Once upon a time", "The sea is", "My favourite food is",
           "In 1999,", "Dear friend,", "The best way to learn is", "Hello, my name is"]


def edits_for(sae15: SAE, sae5: SAE) -> list[list]:
    return [[Steer(sae15, [4154], 80.0)], [Clamp(sae15, [1297], 60.0)],
            [Ablate(sae15, [4154, 1062])], [Scale(sae15, [1062], 4.0)],
            [Steer(sae5, [7], 30.0)], [Clamp(sae5, [1, 2, 3], 5.0)],
            [Scale(sae5, [11], 0.0), Steer(sae15, [4154], -40.0)], [Ablate(sae5, [5])]]


def run_rows(model, tok, rows: list[Row]) -> tuple[float, int]:
    """Seconds and tokens to generate ``rows`` together."""
    gen = BatchGenerator(model, tok)
    for r in rows:
        gen.add(r)
    n, t0 = 0, time.perf_counter()
    while gen.busy:
        n += len(gen.step())
    return time.perf_counter() - t0, n


def throughput(model, tok, edits: list[list], n_tokens: int, rounds: int) -> None:
    """Each configuration ``rounds`` times, interleaved; the fastest run of each counts (the
    machine is shared: the minimum is the run least disturbed by others)."""
    ids = [prompt_ids(tok, p)[0].tolist() for p in PROMPTS]

    def rows(with_edits: bool) -> list[Row]:
        return [Row(i, e if with_edits else [], n_tokens, stop_ids=[]) for i, e in zip(ids, edits, strict=True)]

    def one_at_a_time() -> tuple[float, int]:
        t_sum, n_sum = 0.0, 0
        for r in rows(True):
            t, n = run_rows(model, tok, [r])
            t_sum, n_sum = t_sum + t, n_sum + n
        return t_sum, n_sum

    run_rows(model, tok, rows(True)[:2])  # warm-up
    runs: dict[str, list[tuple[float, int]]] = {"plain": [], "edited": [], "one": []}
    for _ in range(rounds):
        runs["plain"].append(run_rows(model, tok, rows(False)))
        runs["edited"].append(run_rows(model, tok, rows(True)))
        runs["one"].append(one_at_a_time())
    rate = {k: max(n / t for t, n in v) for k, v in runs.items()}
    for key, label in (("plain", "batch of 8, no edits:         "),
                       ("edited", "batch of 8, 8 distinct edits: "),
                       ("one", "8 edited rows one at a time:  ")):
        all_runs = ", ".join(f"{n / t:.1f}" for t, n in runs[key])
        print(f"{label} {rate[key]:7.1f} tokens/s (best of {rounds}: {all_runs})")
    print(f"edited batch / plain batch:    {rate['edited'] / rate['plain']:.2f}x (target >= 0.9x)")
    print(f"edited batch / one at a time:  {rate['edited'] / rate['one']:.2f}x")


def latency(model, tok, sae5_dir: str, n_requests: int, n_tokens: int) -> None:
    import httpx
    import uvicorn

    from llamascope_sdk.serve import Limits, ServeConfig, create_app
    from llamascope_sdk.serve.runner import bind
    from llamascope_sdk.steering.pool import SaePool

    cfg = ServeConfig(model_id="smollm2-135m", served_saes=(sae5_dir, "demo"),
                      limits=Limits(max_tokens=256), max_batch=16, max_queue=64)
    app = create_app(model, tok, SaePool("2GB"), cfg)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    import threading

    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    menu = [[{"sae": "demo", "feature": 4154, "value": 80.0}],
            [{"sae": "demo", "feature": 1297, "mode": "clamp", "value": 60.0}],
            [{"sae": "demo", "feature": [4154, 1062], "mode": "ablate"}],
            [{"sae": sae5_dir, "feature": 7, "value": 30.0}],
            [{"sae": sae5_dir, "feature": 11, "mode": "scale", "value": 0.0}], []]
    rng = random.Random(0)

    def one(k: int) -> float:
        body = {"prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": n_tokens,
                "steering": rng.choice(menu)}
        t0 = time.perf_counter()
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0

    try:
        one(0)  # warm-up: loads the SAEs
        for clients in (1, 4, 16):
            n = max(n_requests, clients)
            with ThreadPoolExecutor(clients) as ex:
                t0 = time.perf_counter()
                lat = sorted(ex.map(one, range(n)))
                wall = time.perf_counter() - t0
            p50 = statistics.median(lat)
            p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
            print(f"{clients:2d} concurrent clients: p50 {p50:6.2f} s, p95 {p95:6.2f} s over {n} "
                  f"requests of {n_tokens} tokens ({n * n_tokens / wall:.1f} tokens/s served)")
    finally:
        server.should_exit = True
        thread.join(timeout=120)
        sock.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="tokens per row / request")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each batch setting")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine a second thread mostly waits "
                         "for the first, measured 5-10x slower under load)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    sae15 = SAE.from_pretrained(demo.DEMO_SAE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers import make_release

        sae5_dir = str(make_release(Path(tmp) / "L5R", layer=5, d_model=576, d_sae=2048, seed=5,
                                    threshold=0.02))
        sae5 = SAE.from_pretrained(sae5_dir)
        print(f"SmolLM2-135M fp32 on {torch.get_num_threads()} CPU threads, {args.tokens} tokens "
              "per row, greedy")
        throughput(model, tok, edits_for(sae15, sae5), args.tokens, args.rounds)
        latency(model, tok, sae5_dir, args.requests, args.tokens // 2)


if __name__ == "__main__":
    main()
