"""`llamascope bench` on this CPU: the demo SAE (SmolLM2-135M, layer-15 residual) with core +
sparse probing (sae-probes protocol) + absorption, then a second SAE at the same hook point.

Run once, niced (the machine is shared)::

    PYTHONPATH=. nice python bench/bench_benchmark.py --out /tmp/bench_benchmark

Needs the ``bench`` extra (scikit-learn, zstandard) and ``pip install --no-deps
sae-probes==0.4.2``. ``--all`` probes every one of the 113 sae-probes datasets, as the protocol
does; their 334,092 prompts are 35.1M SmolLM2 tokens, 18.4M distinct ones (the cache runs each
distinct row once), many hours of forward passes on 2 shared CPU cores. Without ``--all`` it
probes a stated subset (``--names``, or every k-th of the datasets whose prompts total at most
``--max-dataset-chars`` characters; the choice is printed). ``--plan`` first tokenises every
dataset and prints the all-datasets cost (rows, tokens, distinct tokens), and at the end a
**projection** of the all-datasets run from this run's measured rates (labelled as such).

Run A benchmarks the demo SAE in a fresh folder; run B benchmarks the second SAE ("demo-half":
the demo SAE with features 2304.. switched off, a synthetic narrower SAE) in the same folder,
so its activations, dense baselines and absorption probes come from A's cache; B's time over
A's is the "second SAE at the same hook" ratio. Prints the time per dataset (model forward,
the rest of the capture, probe fitting), the share of model forward vs probe fitting, the rows
copied instead of recomputed, both runs' totals, the comparison table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llamascope_sdk.benchmark import datasets as D
from llamascope_sdk.benchmark.report import plot, table
from llamascope_sdk.benchmark.run import BenchSettings, benchmark
from llamascope_sdk.loading.sae import SAE


def choose(max_chars: int, every: int, limit: int) -> list[str]:
    """Every ``every``-th, by increasing size, of the datasets whose prompts total at most
    ``max_chars`` characters (a proxy for tokens that needs no tokenizer), at most ``limit``."""
    sizes = {n: sum(len(p) for p in D.load(n).prompts) for n in D.dataset_names()}
    small = sorted((n for n, c in sizes.items() if c <= max_chars), key=lambda n: sizes[n])
    print(f"{len(small)} of {len(sizes)} datasets have <= {max_chars:,} prompt characters")
    return small[::every][:limit]


def plan(names: list[str]) -> dict[str, int]:
    """Rows, tokens and distinct tokens the protocol feeds the model for ``names`` (SmolLM2's
    tokenizer, BOS first, the last 1,023 tokens kept, as the activation cache does)."""
    from transformers import AutoTokenizer

    from llamascope_sdk.benchmark.activations import MAX_LEN
    from llamascope_sdk.corpus import bos_ids
    from llamascope_sdk.loading.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    bos = bos_ids(tok)
    seen: dict[tuple[int, ...], int] = {}
    rows = tokens = 0
    for n in names:
        prompts = list(D.load(n).prompts)
        for ids in tok(prompts, add_special_tokens=False)["input_ids"]:
            row = tuple(bos + ids[-(MAX_LEN - len(bos)):])
            seen[row] = len(row)
            rows, tokens = rows + 1, tokens + len(row)
    return {"datasets": len(names), "rows": rows, "tokens": tokens,
            "distinct_rows": len(seen), "distinct_tokens": sum(seen.values())}


def half_sae() -> SAE:
    sae = SAE.from_pretrained("demo")
    with torch.no_grad():
        sae.W_enc[sae.d_sae // 2:] = 0
        sae.b_enc[sae.d_sae // 2:] = 0
    return sae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="/tmp/bench_benchmark")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--max-dataset-chars", type=int, default=48_100)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--datasets", type=int, default=5)
    ap.add_argument("--names", default="", help="comma-separated dataset names (a subset)")
    ap.add_argument("--all", action="store_true", help="all 113 datasets (hours on a CPU)")
    ap.add_argument("--plan", action="store_true",
                    help="print the all-datasets cost first, and a projection at the end")
    ap.add_argument("--core-tokens", type=int, default=1024)
    ap.add_argument("--absorption-words", type=int, default=600)
    args = ap.parse_args()
    cost = None
    if args.plan:
        t = time.perf_counter()
        cost = plan(D.dataset_names())
        print(f"all {cost['datasets']} datasets: {cost['rows']:,} rows, {cost['tokens']:,} tokens; "
              f"{cost['distinct_rows']:,} distinct rows, {cost['distinct_tokens']:,} distinct "
              f"tokens ({time.perf_counter() - t:.0f} s to count)")
    if args.all:
        names = D.dataset_names()
    elif args.names:
        names = args.names.split(",")
    else:
        names = choose(args.max_dataset_chars, args.every, args.datasets)
    print(f"datasets ({len(names)} of {len(D.dataset_names())}): {', '.join(names)}")
    s = BenchSettings(metrics=("core", "probing", "absorption"), n_seeds=args.seeds,
                      datasets=names, core_tokens=args.core_tokens,
                      absorption_words=args.absorption_words)
    out = Path(args.out)
    t = time.perf_counter()
    a = benchmark(["demo"], out=out, model="smollm2-135m", settings=s)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    b = benchmark({"demo-half": half_sae()}, out=out, model="smollm2-135m", settings=s)
    t2 = time.perf_counter() - t
    report(a.timing, b.timing, t1, t2)
    if cost is not None:
        project(a.timing, cost, t1)
    both = {**a.outputs, **b.outputs}
    text = table(both)
    (out / "comparison_both.md").write_text(text)
    plot(both, out / "comparison_both.png")
    print(text)
    (out / "bench_timing.json").write_text(json.dumps({"A": a.timing, "B": b.timing,
                                                       "t1": t1, "t2": t2}, indent=1))


def report(ta: dict, tb: dict, t1: float, t2: float) -> None:
    per = ta.get("probing_per_dataset", {})
    print(f"\n{'dataset':44s} {'rows':>5s} {'reused':>6s} {'model tok':>9s} {'forward s':>9s} "
          f"{'other capture s':>15s} {'probe fit s':>11s}")
    for name, v in per.items():
        print(f"{name:44s} {v['rows']:5d} {v['reused_rows']:6d} {v['model_tokens']:9d} "
              f"{v['forward_s']:9.1f} {v['activations_s'] - v['forward_s']:15.1f} "
              f"{v['probe_fit_s']:11.1f}")
    fwd = sum(v["forward_s"] for v in per.values())
    act = sum(v["activations_s"] for v in per.values())
    fit = sum(v["probe_fit_s"] for v in per.values())
    tot = act + fit
    print(f"probing, {len(per)} datasets: model forward {fwd:.1f} s = {fwd / tot:.0%}, the rest "
          f"of the capture (tokenise, copy reused rows, write) {act - fwd:.1f} s = "
          f"{(act - fwd) / tot:.0%}, probe fitting {fit:.1f} s = {fit / tot:.0%}")
    toks, padded = ta.get("activation_tokens", 0), ta.get("activation_padded_tokens", 0)
    print(f"  activations (probing + absorption): {toks:,} tokens through the model "
          f"({padded:,} with padding, {padded / max(toks, 1) - 1:.1%} padding), "
          f"{ta.get('activation_reused_rows', 0):,} rows ({ta.get('activation_reused_tokens', 0):,}"
          f" tokens) copied from identical rows; "
          f"{toks / max(ta.get('activation_forward_s', 1e-9), 1e-9):.0f} tokens/s of forward")
    for key in ("load_s", "core_s", "probing_s", "absorption_s", "activation_forward_s",
                "tokenize_s"):
        print(f"  A {key:22s} {ta.get(key, 0):8.1f} s   B {tb.get(key, 0):8.1f} s")
    print(f"run A (demo SAE, cold cache): {t1:.1f} s = {t1 / 60:.1f} min")
    print(f"run B (second SAE, same hook, warm cache): {t2:.1f} s; B / A = {t2 / t1:.2f} "
          f"(target <= 0.33)")
    nb = t2 - tb.get("core_s", 0) - tb.get("load_s", 0)
    na = t1 - ta.get("core_s", 0) - ta.get("load_s", 0)
    print(f"  without model load and core: B / A = {nb / na:.2f}")


def project(ta: dict, cost: dict[str, int], t1: float) -> None:
    """A PROJECTION (not a measurement) of run A on all datasets: this run's forward rate on
    the distinct tokens of all datasets, its mean probe fitting per dataset, the rest as run."""
    per = ta.get("probing_per_dataset", {})
    rate = ta["activation_tokens"] / ta["activation_forward_s"]
    fwd = cost["distinct_tokens"] / rate
    fit = cost["datasets"] * sum(v["probe_fit_s"] for v in per.values()) / max(len(per), 1)
    other = t1 - ta.get("probing_s", 0)
    total = fwd + fit + other
    print(f"PROJECTION for all {cost['datasets']} datasets (from this run's rates, not run): "
          f"forward {cost['distinct_tokens']:,} distinct tokens / {rate:.0f} tokens/s = "
          f"{fwd / 3600:.1f} h, probe fitting {cost['datasets']} x "
          f"{fit / cost['datasets']:.0f} s = {fit / 60:.0f} min, load + core + absorption "
          f"{other / 60:.1f} min: {total / 3600:.1f} h (target 20 min); forward share of "
          f"probing {fwd / (fwd + fit):.0%}")


if __name__ == "__main__":
    main()
