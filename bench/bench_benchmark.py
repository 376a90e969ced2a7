"""`llamascope bench` on this CPU: the demo SAE (SmolLM2-135M, layer-15 residual) with core +
sparse probing (sae-probes protocol) + absorption, then a second SAE at the same hook point.

Run once, niced (the machine is shared)::

    PYTHONPATH=. nice python bench/bench_benchmark.py --out /tmp/bench_benchmark

Needs the ``bench`` extra (scikit-learn, zstandard) and ``pip install --no-deps
sae-probes==0.4.2``. The sae-probes datasets hold 35 million SmolLM2 tokens (334,092 prompts),
hours of forward passes on 2 CPU cores, so this script probes a stated subset (``--datasets``):
every k-th of the datasets whose prompts total at most ``--max-dataset-chars`` characters
(the choice is printed). Run A benchmarks the demo SAE in a fresh folder; run B benchmarks the
second SAE ("demo-half": the demo SAE with features 2304.. switched off, a synthetic narrower
SAE) in the same folder, so its activations, dense baselines and absorption probes come from
A's cache; B's time over A's is the "second SAE at the same hook" ratio. Prints the time per
dataset, the share of model forward vs probe fitting, both runs' totals, the comparison table.
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
    ap.add_argument("--core-tokens", type=int, default=1024)
    ap.add_argument("--absorption-words", type=int, default=600)
    args = ap.parse_args()
    names = choose(args.max_dataset_chars, args.every, args.datasets)
    print(f"datasets ({len(names)} of {len(D.dataset_names())}; every {args.every}-th of those, "
          f"smallest first): {', '.join(names)}")
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
    both = {**a.outputs, **b.outputs}
    text = table(both)
    (out / "comparison_both.md").write_text(text)
    plot(both, out / "comparison_both.png")
    print(text)
    (out / "bench_timing.json").write_text(json.dumps({"A": a.timing, "B": b.timing,
                                                       "t1": t1, "t2": t2}, indent=1))


def report(ta: dict, tb: dict, t1: float, t2: float) -> None:
    per = ta.get("probing_per_dataset", {})
    print(f"\n{'dataset':40s} {'rows':>5s} {'activations s':>13s} {'probe fit s':>11s}")
    for name, v in per.items():
        print(f"{name:40s} {v['rows']:5d} {v['activations_s']:13.1f} {v['probe_fit_s']:11.1f}")
    act = sum(v["activations_s"] for v in per.values())
    fit = sum(v["probe_fit_s"] for v in per.values())
    print(f"probing: model forward (activation capture) {act:.1f} s = {act / (act + fit):.0%}, "
          f"probe fitting {fit:.1f} s = {fit / (act + fit):.0%}")
    for key in ("load_s", "core_s", "probing_s", "absorption_s", "activation_forward_s"):
        print(f"  A {key:22s} {ta.get(key, 0):8.1f} s   B {tb.get(key, 0):8.1f} s")
    print(f"run A (demo SAE, cold cache): {t1:.1f} s = {t1 / 60:.1f} min")
    print(f"run B (second SAE, same hook, warm cache): {t2:.1f} s; B / A = {t2 / t1:.2f} "
          f"(target <= 0.33)")
    nb = t2 - tb.get("core_s", 0) - tb.get("load_s", 0)
    na = t1 - ta.get("core_s", 0) - ta.get("load_s", 0)
    print(f"  without model load and core: B / A = {nb / na:.2f}")


if __name__ == "__main__":
    main()
