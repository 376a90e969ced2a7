"""Steer generation with an SAE feature and compare with the baseline, offline.

    python examples/02_steer_generation.py                        # demo SAE, its suggested feature
    python examples/02_steer_generation.py --feature 123 --strength 6 --relative
"""

import argparse

from llamascope_sdk import SAE, compare_generations, load_model, measure_feature_stats
from llamascope_sdk.demo import DEMO_FEATURE, DEMO_MODEL, DEMO_SAE_DIR
from llamascope_sdk.interventions import Steer

ap = argparse.ArgumentParser()
ap.add_argument("--sae", default=str(DEMO_SAE_DIR))
ap.add_argument("--model", default=DEMO_MODEL)
ap.add_argument("--feature", type=int, default=DEMO_FEATURE.index)
ap.add_argument("--strength", type=float, default=DEMO_FEATURE.strength)
ap.add_argument("--relative", action="store_true",
                help="strength in units of the feature's typical activation")
ap.add_argument("--prompt", default=DEMO_FEATURE.prompt)
ap.add_argument("--max-new-tokens", type=int, default=30)
args = ap.parse_args()

sae = SAE.from_pretrained(args.sae)
model, tokenizer = load_model(args.model)
if args.relative:  # measure what "typical" means for this SAE on some text first
    measure_feature_stats(model, tokenizer, sae, ["The quick brown fox jumps over the lazy dog."] * 4)

steer = Steer(sae, [args.feature], args.strength, positions="all", relative=args.relative)
result = compare_generations(model, tokenizer, args.prompt, [steer], max_new_tokens=args.max_new_tokens)
print("prompt:  ", args.prompt)
print("baseline:", result.baseline)
print("steered: ", result.steered)
