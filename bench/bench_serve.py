"""Throughput and latency of batched steering and of `llamascope serve` against
`transformers serve --continuous-batching`, measured in one run.

1. tokens/s of one batch of 8 rows with 8 distinct edits (add, clamp, scale, ablate on two
   SAEs at layers 15 and 5 of SmolLM2-135M) against the same batch with no edits (target
   >= 0.9x) and against the same 8 rows run one at a time (``--skip-batch`` skips this);
2. both servers as subprocesses with the same torch threads, the same model folder and prompts:
   completion tokens/s (summed ``usage.completion_tokens`` over the wall time) and p50/p95
   request latency at 1, 4 and 8 concurrent clients (max(8, 2 x clients) requests each), for
   ``transformers serve --continuous-batching``, llamascope serve without edits (also with
   ``--row-copies off``, the one-row decode layout's share), and
   llamascope serve with 8 distinct edits in the batch (targets: >= 1.1x and >= 1.0x the
   transformers figure at every client count). The settings run interleaved, ``--rounds``
   times, and the fastest run of each counts (the machine may be shared; the 1-minute load
   average is printed before and after);
3. one loglikelihood request of 512 prompt tokens (lm-eval's body: echo, logprobs 1,
   max_tokens 1) against one forward of the prompt (target <= 1.1x).

Greedy, fp32 on CPU; a request ends at EOS or after --tokens tokens (the same rule for both
servers, and the tokens counted are the ones each reports).

    python bench/bench_serve.py [--tokens 32] [--rounds 2] [--threads 1] [--clients 1 4 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llamascope_sdk import SAE, Ablate, Clamp, Scale, Steer, load_model  # noqa: E402
from llamascope_sdk.loading import demo  # noqa: E402
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


@torch.no_grad()
def bare_loop(model, tok, ids: list[list[int]], n_tokens: int) -> tuple[float, int]:
    """The floor: the same rows left-padded, one prefill and greedy decode steps of the plain
    transformers forward (KV cache, last-position logits), no scheduler, no hooks."""
    from transformers import DynamicCache

    width = max(map(len, ids))
    x = torch.tensor([[tok.pad_token_id or 0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    t0, cache = time.perf_counter(), DynamicCache()
    for step in range(n_tokens):
        out = model(input_ids=x, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        x = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        pos = pos[:, -1:] + 1
        cache = out.past_key_values
        assert step < n_tokens
    return time.perf_counter() - t0, n_tokens * len(ids)


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
    runs: dict[str, list[tuple[float, int]]] = {"bare": [], "plain": [], "edited": [], "one": []}
    for _ in range(rounds):
        runs["bare"].append(bare_loop(model, tok, ids, n_tokens))
        runs["plain"].append(run_rows(model, tok, rows(False)))
        runs["edited"].append(run_rows(model, tok, rows(True)))
        runs["one"].append(one_at_a_time())
    rate = {k: max(n / t for t, n in v) for k, v in runs.items()}
    for key, label in (("bare", "bare transformers loop of 8:  "),
                       ("plain", "batch of 8, no edits:         "),
                       ("edited", "batch of 8, 8 distinct edits: "),
                       ("one", "8 edited rows one at a time:  ")):
        all_runs = ", ".join(f"{n / t:.1f}" for t, n in runs[key])
        print(f"{label} {rate[key]:7.1f} tokens/s (best of {rounds}: {all_runs})")
    print(f"plain batch / bare loop:       {rate['plain'] / rate['bare']:.2f}x (the generator's "
          "own cost per step: scheduling, masks, picking tokens)")
    print(f"edited batch / plain batch:    {rate['edited'] / rate['plain']:.2f}x (target >= 0.9x)")
    print(f"edited batch / one at a time:  {rate['edited'] / rate['one']:.2f}x")


EIGHT = [[{"sae": "demo", "feature": 4154, "value": 80.0}],
         [{"sae": "demo", "feature": 1297, "mode": "clamp", "value": 60.0}],
         [{"sae": "demo", "feature": [4154, 1062], "mode": "ablate"}],
         [{"sae": "demo", "feature": 1062, "mode": "scale", "value": 4.0}],
         [{"sae": "L5", "feature": 7, "value": 30.0}],
         [{"sae": "L5", "feature": [1, 2, 3], "mode": "clamp", "value": 5.0}],
         [{"sae": "L5", "feature": 11, "mode": "scale", "value": 0.0},
          {"sae": "demo", "feature": 4154, "value": -40.0}],
         [{"sae": "L5", "feature": 5, "mode": "ablate"}]]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], port: int, threads: int, log: Path) -> subprocess.Popen[bytes]:
    """Start a server subprocess (``threads`` torch threads) and wait for its /health."""
    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(["nice", *cmd], stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:3]} exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{cmd[:3]} did not answer /health in 600 s")


def _load(url: str, bodies: list[dict], clients: int) -> tuple[float, float, float, int]:
    """Send ``bodies`` from ``clients`` concurrent clients: (completion tokens per second over
    the wall time, p50 and p95 latency in seconds, completion tokens).

    The clients share one ``httpx.Client`` (kept-alive connections, as the openai client and
    lm-eval keep theirs), made before the clock starts: a new client per request spends ~40 ms
    of CPU building its TLS context, and 8 client threads doing that one after another (the
    GIL) put ~0.3 s between a batch's answers and the next requests, the same for both servers
    but not the servers' time."""
    import httpx

    def one(body: dict) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = http.post(url, json=body)
        r.raise_for_status()
        return time.perf_counter() - t0, int(r.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(timeout=900, limits=limits) as http, ThreadPoolExecutor(clients) as ex:
        t0 = time.perf_counter()
        got = list(ex.map(one, bodies))
        wall = time.perf_counter() - t0
    lat = sorted(t for t, _ in got)
    n = sum(k for _, k in got)
    p95 = lat[min(len(lat) - 1, int(round(0.95 * (len(lat) - 1))))]
    return n / wall, statistics.median(lat), p95, n


def versus_transformers(folder: str, sae5_dir: str, n_tokens: int, threads: int,
                        rounds: int, tmp: Path, client_counts: list[int]) -> None:
    """tokens/s and latency of llamascope serve (no edits; 8 distinct edits) and of
    ``transformers serve --continuous-batching`` on the same model and prompts, back to back.
    Its paged KV cache is capped at 512 blocks of 32 tokens (16,384 tokens, 0.75 GB for this
    model): sized by default from the machine's memory, its engine was killed by the kernel
    (out of memory) on a shared 23 GB machine."""
    ours, theirs, plain = _free_port(), _free_port(), _free_port()
    serve = [sys.executable, "-m", "llamascope_sdk", "serve", "--model", "smollm2-135m",
             "--sae", sae5_dir, "--sae", "demo", "--max-batch", "16"]
    procs = [
        _start([*serve, "--port", str(ours)], ours, threads, tmp / "llamascope.log"),
        _start([*serve, "--port", str(plain), "--row-copies", "off"], plain, threads,
               tmp / "llamascope-no-row-copies.log"),
        _start([str(Path(sys.executable).parent / "transformers"), "serve", folder,
                "--continuous-batching", "--device", "cpu", "--dtype", "float32", "--port",
                str(theirs), "--log-level", "warning", "--cb-block-size", "32",
                "--cb-num-blocks", "512"], theirs, threads, tmp / "transformers.log"),
    ]
    try:
        def bodies(model: str, clients: int, edits: bool) -> list[dict]:
            n = max(8, 2 * clients)
            out = []
            for k in range(n):
                b = {"model": model, "prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": n_tokens,
                     "temperature": 0}
                if edits:
                    b["steering"] = [{**e, "sae": sae5_dir if e["sae"] == "L5" else e["sae"]}
                                     for e in EIGHT[k % len(EIGHT)]]
                out.append(b)
            return out

        setups = {"transformers serve --continuous-batching": (theirs, folder, False),
                  "llamascope serve, no edits": (ours, "smollm2-135m", False),
                  "  the same, --row-copies off": (plain, "smollm2-135m", False),
                  "llamascope serve, 8 distinct edits": (ours, "smollm2-135m", True)}
        for port, model, edits in setups.values():  # warm-up (SAEs loaded, kernels ready)
            _load(f"http://127.0.0.1:{port}/v1/completions", bodies(model, 8, edits)[:8], 8)
        print(f"\n/v1/completions, {n_tokens} tokens per request, greedy, {threads} torch "
              "thread(s) per server; best of {rounds} interleaved rounds:".replace("{rounds}", str(rounds)))
        for clients in client_counts:
            best: dict[str, tuple[float, float, float, int]] = {}
            for _ in range(rounds):
                for name, (port, model, edits) in setups.items():
                    r = _load(f"http://127.0.0.1:{port}/v1/completions",
                              bodies(model, clients, edits), clients)
                    if name not in best or r[0] > best[name][0]:
                        best[name] = r
            base = best["transformers serve --continuous-batching"][0]
            for name, (rate, p50, p95, n) in best.items():
                ratio = "" if name.startswith("transformers") else f"  {rate / base:.2f}x"
                print(f"{clients} client(s)  {name:42s} {rate:6.1f} tokens/s  p50 {p50:6.2f} s  "
                      f"p95 {p95:6.2f} s  ({n} tokens){ratio}")
        loglikelihood_cost(ours, threads, rounds)
    except Exception:
        for name in ("llamascope.log", "llamascope-no-row-copies.log", "transformers.log"):
            print(f"--- {name} (last lines):\n{(tmp / name).read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=120)


def loglikelihood_cost(port: int, threads: int, rounds: int) -> None:
    """One loglikelihood request of 512 prompt tokens (lm-eval's body: echo, logprobs 1,
    max_tokens 1) against one forward of the same 512 tokens in this process, same threads."""
    import httpx

    model, _ = load_model("smollm2-135m")
    ids = [(7 * i + 13) % 20000 + 200 for i in range(512)]
    body = {"model": "smollm2-135m", "prompt": [ids], "max_tokens": 1, "logprobs": 1,
            "echo": True, "temperature": 0}
    url = f"http://127.0.0.1:{port}/v1/completions"
    torch.set_num_threads(threads)
    x = torch.tensor([ids])
    fwd, req = [], []
    with httpx.Client(timeout=900) as http:
        for _ in range(rounds + 1):  # the first of each is a warm-up
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)
            fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = http.post(url, json=body)
            req.append(time.perf_counter() - t0)
            r.raise_for_status()
            assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == 513
    f, q = min(fwd[1:]), min(req[1:])
    print(f"\nloglikelihood request of 512 prompt tokens: {q:.3f} s (HTTP, JSON, scoring "
          f"included) vs one forward of the prompt {f:.3f} s: {q / f:.2f}x (target <= 1.1x; "
          f"best of {rounds})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32, help="tokens per row / request")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved runs of each setting")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads, here and in each server (1: on a shared machine a "
                         "second thread mostly waits for the first)")
    ap.add_argument("--skip-batch", action="store_true", help="only the server comparison")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8],
                    help="concurrent client counts to measure")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from llamascope_sdk.loading.models import resolve_model_path

    with tempfile.TemporaryDirectory() as tmp:
        from tests.helpers import make_release

        sae5_dir = str(make_release(Path(tmp) / "L5R", layer=5, d_model=576, d_sae=2048, seed=5,
                                    threshold=0.02))
        print(f"SmolLM2-135M fp32 on {args.threads} CPU thread(s), {args.tokens} tokens per "
              f"row, greedy; load before: {os.getloadavg()[0]:.2f} (1-min average, "
              f"{os.cpu_count()} cores)")
        if not args.skip_batch:
            model, tok = load_model("smollm2-135m")
            sae15, sae5 = SAE.from_pretrained(demo.DEMO_SAE_DIR), SAE.from_pretrained(sae5_dir)
            throughput(model, tok, edits_for(sae15, sae5), args.tokens, args.rounds)
        versus_transformers(resolve_model_path("smollm2-135m"), sae5_dir, args.tokens,
                            args.threads, args.rounds, Path(tmp), args.clients)
        print(f"load after: {os.getloadavg()[0]:.2f} (1-min average)")


if __name__ == "__main__":
    main()
