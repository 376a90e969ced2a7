"""Cost of steering/editing/splicing during generation, on SmolLM2-135M on CPU.

Greedy generation of 64 tokens (KV cache), one synthetic SAE at d_sae = 576*8 = 4608 on the
layer-15 residual. Configurations run interleaved, REPEATS times each; the table shows medians
and the ratio to the bare model. Targets: additive steering <= 1.03x, clamp/ablate of 8 features
<= 1.05x. The full splice (full encode + decode + error term per step) is reported as its
overhead over the bare model divided by the cost of the bare SAE forward on the same tokens.

Run: python bench/bench_steer.py [--repeats 3] [--tokens 64] [--budget 200]
On a shared, loaded CPU the ratios are noise-dominated; the per-step SAE cost is ~1 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

# The repo root first: `python bench/bench_steer.py` puts bench/ on sys.path, not the root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamascope_sdk import SAE, attach
from llamascope_sdk.loading.models import load_model, special_ids, tokenize
from llamascope_sdk.steering.interventions import Ablate, Clamp, Steer

PROMPT = "Write a short paragraph about the history of the city of Lyon and its rivers."
LAYER, D, F = 15, 576, 4608


def synthetic_sae(model, ids: torch.Tensor, l0: int = 50) -> tuple[SAE, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(D, F, generator=g) / D**0.5 * (0.3 + 2.7 * torch.rand(F, generator=g))
    raw = {"encoder.weight": torch.randn(F, D, generator=g) / D**0.5,
           "encoder.bias": 0.1 * torch.randn(F, generator=g), "decoder.weight": dec,
           "decoder.bias": 0.1 * torch.randn(D, generator=g)}
    hp = {"d_model": D, "d_sae": F, "hook_point_in": f"blocks.{LAYER}.hook_resid_post",
          "hook_point_out": f"blocks.{LAYER}.hook_resid_post", "act_fn": "jumprelu",
          "jump_relu_threshold": 0.0, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 24.0, "out": 24.0}}
    sae = SAE.from_raw(hp, raw)
    with attach(model, [sae], capture=("inputs",)) as h, torch.no_grad():
        model(input_ids=ids)
    pre = sae.pre_acts(h.inputs[sae.name][:, 1:]).flatten()
    sae.threshold.fill_(float(pre.topk(l0 * (ids.shape[1] - 1)).values[-1]))
    return sae, h.inputs[sae.name]


def generate(model, tok, ids: torch.Tensor, n: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=tok.pad_token_id)
    return time.perf_counter() - t0


def bare_sae_cost(sae: SAE, x_prompt: torch.Tensor, n: int) -> float:
    """One full SAE forward on the prompt, then n-1 single-token forwards: what a splice adds."""
    x1 = x_prompt[:, -1:]
    t0 = time.perf_counter()
    with torch.no_grad():
        sae(x_prompt)
        for _ in range(n - 1):
            sae(x1)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=200.0,
                    help="stop adding repeats after this many seconds (at least one is run)")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    t_start = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    ids = tokenize(tok, PROMPT)
    sae, x_prompt = synthetic_sae(model, ids)
    sp = special_ids(tok)
    feats = list(range(0, 8 * 37, 37))
    configs = {
        "baseline": dict(),
        "steer 1 feature": dict(interventions=[Steer(sae, [3], 10.0)]),
        "clamp 8 features": dict(interventions=[Clamp(sae, feats, 5.0)]),
        "ablate 8 features": dict(interventions=[Ablate(sae, feats)]),
        "splice (full SAE)": dict(saes=[sae], splice=True, capture=False),
    }
    times: dict[str, list[float]] = {k: [] for k in configs}
    generate(model, tok, ids, 8)  # warm-up
    done = 0
    while done < args.repeats and (done == 0 or time.perf_counter() - t_start < args.budget):
        done += 1
        for name, kw in configs.items():
            with attach(model, special_ids=sp, **kw):
                times[name].append(generate(model, tok, ids, args.tokens))
    sae_cost = statistics.median(bare_sae_cost(sae, x_prompt, args.tokens) for _ in range(5))

    base = statistics.median(times["baseline"])
    targets = {"steer 1 feature": 1.03, "clamp 8 features": 1.05,
               "ablate 8 features": 1.05}
    print(f"SmolLM2-135M CPU ({torch.get_num_threads()} threads), greedy {args.tokens} tokens, "
          f"prompt {ids.shape[1]} tokens, SAE d_sae={F} at L{LAYER}R, median of {done} "
          "interleaved runs")
    print(f"{'config':<20} {'median s':>9} {'ratio':>7} {'target':>7}  result")
    for name, ts in times.items():
        med = statistics.median(ts)
        ratio = med / base
        tgt = targets.get(name)
        verdict = "" if tgt is None else ("PASS" if ratio <= tgt else "FAIL")
        tgt_s = f"<={tgt:.2f}" if tgt else ""
        print(f"{name:<20} {med:9.3f} {ratio:6.3f}x {tgt_s:>7}  {verdict}")
    overhead = statistics.median(times["splice (full SAE)"]) - base
    print(f"splice overhead {overhead * 1e3:.1f} ms vs bare SAE forward on the same tokens "
          f"{sae_cost * 1e3:.1f} ms: {overhead / sae_cost:.2f}x the bare SAE cost")
    print(f"total bench time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
