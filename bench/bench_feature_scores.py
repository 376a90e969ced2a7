"""Time to score every feature of the demo SAE (4,608 features, SmolLM2-135M, CPU): the output
score (Arad et al. 2025) and ΔToken Confidence, batched. Target: <= 600 s on a 2-core CPU.

Run: python bench/bench_feature_scores.py [--batch-size 256] [--save DIR]
Prints the wall time, its ratio to the target, features per second and the ten features with
the highest output score. ``--save DIR`` writes DIR/feature_scores.safetensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamascope_sdk import SAE, load_model
from llamascope_sdk.store.scores import score_features

TARGET_S = 600.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--save", type=Path, default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok = load_model("smollm2-135m")
    sae = SAE.from_pretrained("demo")
    t0 = time.perf_counter()
    scores = score_features(model, tok, sae, batch_size=args.batch_size)
    dt = time.perf_counter() - t0
    print(f"scored {sae.d_sae:,} features in {dt:.1f} s ({sae.d_sae / dt:.0f} features/s); "
          f"target {TARGET_S:.0f} s: ratio {dt / TARGET_S:.2f} (<= 1 passes); "
          f"torch threads {torch.get_num_threads()}")
    print(f"added length c = {scores.meta['added_length']:.1f} "
          f"(10 x max activation {scores.meta['max_activation']:.1f})")
    for i in scores.top(10):
        g = scores.get(i) or {}
        print(f"  feature {i:5d}  output score {g['output_score']:.4f}  "
              f"delta token confidence {g['delta_token_confidence']:+.4f}  "
              f"{sae.labels.get(i, '')}")
    for i in sorted(sae.labels):
        g = scores.get(i) or {}
        print(f"  labelled {i:5d}  output score {g['output_score']:.4f} "
              f"(#{g['output_score_rank']})  delta token confidence "
              f"{g['delta_token_confidence']:+.4f}  {sae.labels[i]}")
    if args.save:
        print(f"saved {scores.save(args.save)}")


if __name__ == "__main__":
    main()
