"""eval-steer on the demo SAE (SmolLM2-135M, CPU): speed, and the README's results.

Speed (default): a sweep of 6 strengths x 3 features x 16 prompts x 32 new tokens with the
LLM-free metrics (no baselines, no judge); target <= 300 s on a 2-core CPU. Prints the wall
time, its ratio to the target and the load average (the machine is shared: read the ratio
with it).

    python bench/bench_eval_steer.py [--features 4154 1297 1062] [--tokens 32]

Results (``--results OUT``): the demo's three labelled features (each with a concept text
written for its label) and the three features with the highest output score (concept = their
top logit-lens tokens), with the prompt and DiffMean baselines; writes OUT/eval_steer_PART.json,
OUT/eval_steer_PART.md (the tables) and one PNG per feature (--part labelled, top or all).

    python bench/bench_eval_steer.py --results bench/out/eval_steer --prompts 8 --tokens 24 \
        --strengths 0,20,40,80,160 --scores /tmp/scores   # feature_scores.safetensors folder
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamascope_sdk import SAE, load_model
from llamascope_sdk.evaluation.steer_eval import NEUTRAL_PROMPTS, eval_steer

TARGET_S = 300.0
#: Concept texts written for the demo's labels (used for the concept log-probability lift and
#: as DiffMean's positive text).
CONCEPTS = {
    4154: "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.",
    1297: "O thou, whose love is mine, thy heart shall be with thee, and thine with me.",
    1062: "\n\n- the first item\n- the second item\n> a quoted line\n",
}


def speed(args: argparse.Namespace, model, tok, sae) -> None:
    strengths = [float(s) for s in args.strengths.split(",")]
    prompts = list(NEUTRAL_PROMPTS)[:args.prompts]
    t0 = time.perf_counter()
    res = eval_steer(model, tok, sae, args.features, strengths=strengths, prompts=prompts,
                     max_new_tokens=args.tokens, baselines=False)
    dt = time.perf_counter() - t0
    n = len(strengths) * len(args.features) * len(prompts)
    print(f"{len(strengths)} strengths x {len(args.features)} features x {len(prompts)} prompts "
          f"x {args.tokens} new tokens ({n} steered continuations) with the LLM-free metrics: "
          f"{dt:.1f} s; target {TARGET_S:.0f} s: ratio {dt / TARGET_S:.2f} (<= 1 passes); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for r in res:
        c = r.chosen["feature"]
        print(f"  feature {r.feature}: chosen strength {c.strength:g}, concept lift "
              f"{c.concept_lift:+.3f}, perplexity {c.perplexity:.2f}")


def _row(method: str, p) -> str:
    f = lambda v, s: "-" if v is None or v != v else format(v, s)  # noqa: E731
    st = "-" if p.strength is None else f"{p.strength:g}"
    return (f"| {method} | {st} | {f(p.concept_activation, '.2f')} | {f(p.concept_lift, '+.2f')} "
            f"| {f(p.perplexity, '.1f')} | {f(p.distinct, '.2f')} | {f(p.kl, '.2f')} "
            f"| {f(p.dloss, '+.2f')} |")


def results(args: argparse.Namespace, model, tok, sae) -> None:
    from llamascope_sdk.evaluation.steer_plot import plot_sweep
    from llamascope_sdk.store.scores import FeatureScores

    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    scores = FeatureScores.load(args.scores)
    top = scores.top(3)
    strengths = [float(s) for s in args.strengths.split(",")]
    prompts = list(NEUTRAL_PROMPTS)[:args.prompts]
    report, md = [], []
    t0 = time.perf_counter()
    todo = {"labelled": sorted(CONCEPTS), "top": top, "all": [*sorted(CONCEPTS), *top]}[args.part]
    for f in todo:
        r = eval_steer(model, tok, sae, [f], strengths=strengths, prompts=prompts,
                       concept=CONCEPTS.get(f), max_new_tokens=args.tokens)[0]
        plot_sweep(r, out / f"feature_{f}.png")
        d = r.to_dict()
        d["output_score"] = scores.get(f)
        report.append(d)
        sc = scores.get(f) or {}
        md.append(f"\n**Feature {f}** {repr(r.label) if r.label else '(unlabelled)'} — output "
                  f"score {sc.get('output_score', float('nan')):.3f} (#{sc.get('output_score_rank')})"
                  f"; concept lift = {r.concept_measure}\n")
        md.append("| method | chosen strength | feature act. | concept lift | perplexity | "
                  "distinct-2 | KL | d loss |\n|---|---|---|---|---|---|---|---|")
        md.append(_row("none (unsteered)", r.curves["none"][0]))
        for m in ("feature", "diffmean", "prompt"):
            md.append(_row(m, r.chosen[m]))
        print("\n".join(md[-6:]), flush=True)
    (out / f"eval_steer_{args.part}.json").write_text(json.dumps(report, indent=1,
                                                                 allow_nan=False) + "\n")
    (out / f"eval_steer_{args.part}.md").write_text("\n".join(md) + "\n")
    print(f"done in {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, nargs="+", default=[4154, 1297, 1062])
    ap.add_argument("--strengths", default="0,10,20,40,80,160")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--scores", type=Path, default=None)
    ap.add_argument("--part", choices=("all", "labelled", "top"), default="all",
                    help="results: the labelled features, the top-3 by output score, or both")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model("smollm2-135m")
    sae = SAE.from_pretrained("demo")
    if args.results is not None:
        results(args, model, tok, sae)
    else:
        speed(args, model, tok, sae)


if __name__ == "__main__":
    main()
