"""What feature readouts and conditional edits cost, measured in one run (SmolLM2-135M, fp32).

1. Generator (the batch engine `llamascope serve` runs): 8 rows x --tokens new tokens each
   (no stop at EOS, greedy), one batch:
   * readout: no readout vs 8 named features of the demo SAE read on each of the 8 rows
     (target: >= 0.95x tokens/s);
   * condition: each row with the same add edit (demo feature 4154, length 40), unconditional
     vs conditional on a layer-5 feature (target: >= 0.95x tokens/s).
2. Server: the same pairs as 8 concurrent /v1/completions requests on a real server on
   127.0.0.1 (max_tokens = --tokens; a row may stop early at EOS: tokens/s counts the tokens
   returned).

Every pair runs interleaved, --rounds times, and the fastest run of each setting counts (the
machine may be shared: the minimum is the run least disturbed by others). Prints each
setting's tokens/s and the ratios.

    python bench/bench_serve_readout.py [--tokens 32] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llamascope_sdk import SAE, Steer, load_model  # noqa: E402
from llamascope_sdk.loading import demo  # noqa: E402
from llamascope_sdk.steering.batch_generation import BatchGenerator, Row  # noqa: E402
from llamascope_sdk.steering.conditions import FeatureCondition  # noqa: E402
from llamascope_sdk.steering.generation import prompt_ids  # noqa: E402
from llamascope_sdk.steering.readout import Readout  # noqa: E402

PROMPTS = [demo.DEMO_PROMPT, "Once upon a time", "The sea is", "My favourite food is",
           "In 1999,", "Dear friend,", "The best way to learn is", "Hello, my name is"]
FEATURES = [4154, 1297, 1062, 7, 100, 2000, 3000, 4000]


def layer5_sae(folder: Path) -> Path:
    """A synthetic JumpReLU SAE at layer 5 of SmolLM2 (the condition's), written with the
    test suite's release writer."""
    from tests.helpers import make_release

    return make_release(folder, layer=5, d_model=576, d_sae=2048, seed=5, threshold=0.02)


def run_rows(model, tok, rows: list[Row]) -> tuple[float, int]:
    """Seconds and new tokens to generate ``rows`` together."""
    gen = BatchGenerator(model, tok)
    for r in rows:
        gen.add(r)
    n, t0 = 0, time.perf_counter()
    while gen.busy:
        n += sum(t.token is not None for t in gen.step())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, n


def best(settings: dict[str, object], run, rounds: int) -> dict[str, float]:
    """tokens/s of each setting: the fastest of ``rounds`` interleaved runs."""
    rate: dict[str, float] = {k: 0.0 for k in settings}
    for _ in range(rounds):
        for k, arg in settings.items():
            secs, n = run(arg)
            rate[k] = max(rate[k], n / secs)
    return rate


def generator_part(model, tok, sae, cond_sae, n_tokens: int, rounds: int) -> dict[str, float]:
    ids = [prompt_ids(tok, p)[0].tolist() for p in PROMPTS]
    when = FeatureCondition(cond_sae, 7, 0.05)

    def rows(kind: str) -> list[Row]:
        out = []
        for i in ids:
            edits = ([Steer(sae, [4154], 40.0, when=when if kind == "conditional" else None)]
                     if kind in ("edit", "conditional") else [])
            reads = [Readout(sae, FEATURES)] if kind == "readout" else []
            out.append(Row(i, edits, n_tokens, stop_ids=(), readouts=reads))
        return out

    settings = {k: k for k in ("plain", "readout", "edit", "conditional")}
    run_rows(model, tok, rows("plain"))  # warm-up
    return best(settings, lambda k: run_rows(model, tok, rows(k)), rounds)


def serve_part(model, tok, cond_folder: Path, n_tokens: int, rounds: int) -> dict[str, float]:
    import httpx
    import uvicorn

    from llamascope_sdk.serve import Limits, ServeConfig, create_app
    from llamascope_sdk.serve.runner import bind
    from llamascope_sdk.steering.pool import SaePool

    cfg = ServeConfig(model_id="smollm2-135m", served_saes=(str(cond_folder), "demo"),
                      limits=Limits(max_tokens=1024))
    app = create_app(model, tok, SaePool("1GB", device=model.device), cfg)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/completions"
    edit = {"sae": "demo", "feature": 4154, "value": 40.0}
    bodies = {
        "plain": {},
        "readout": {"readout": {"sae": "demo", "features": FEATURES}},
        "edit": {"steering": [edit]},
        "conditional": {"steering": [{**edit, "when": {"sae": str(cond_folder), "feature": 7,
                                                       "above": 0.05}}]},
    }

    def run(extra: dict) -> tuple[float, int]:
        """The 8 requests from 8 threads sharing one kept-alive client (made before the clock
        starts: a new client per request spends ~40 ms of CPU on its TLS context, in this
        process, under the GIL, while the server runs)."""
        def one(p: str) -> int:
            r = http.post(url, json={"prompt": p, "max_tokens": n_tokens, **extra})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=len(PROMPTS))) as http, \
                ThreadPoolExecutor(len(PROMPTS)) as ex:
            t0 = time.perf_counter()
            n = sum(ex.map(one, PROMPTS))
            return time.perf_counter() - t0, n

    run({})  # warm-up: loads the SAEs
    run(bodies["conditional"])
    try:
        return best(bodies, run, rounds)
    finally:
        server.should_exit = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m", device=args.device)
    sae = SAE.from_pretrained(demo.DEMO_SAE_DIR, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = layer5_sae(Path(tmp) / "L5R")
        cond_sae = SAE.from_pretrained(folder, device=args.device)
        print(f"device {args.device}; 8 rows x {args.tokens} new tokens; best of {args.rounds} "
              "interleaved runs")
        report("generator", generator_part(model, tok, sae, cond_sae, args.tokens, args.rounds))
        report("server", serve_part(model, tok, folder, args.tokens, args.rounds))


def report(part: str, rate: dict[str, float]) -> None:
    print(f"{part}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in rate.items()))
    print(f"{part}: readout (8 features x 8 rows) / plain = "
          f"{rate['readout'] / rate['plain']:.3f}x (target >= 0.95)")
    print(f"{part}: conditional edit / unconditional edit = "
          f"{rate['conditional'] / rate['edit']:.3f}x (target >= 0.95)", flush=True)


if __name__ == "__main__":
    main()
