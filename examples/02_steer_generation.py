"""Steer generation with an SAE feature and compare with the baseline, offline.

    python examples/02_steer_generation.py                        # demo SAE, its suggested feature
    python examples/02_steer_generation.py --feature 1297 --strength 4 --relative

``--relative`` expresses the strength in multiples of the feature's typical activation, read
from the SAE's statistics (the demo ships them; for a Llama Scope SAE mine them first with
``llamascope inspect``).
"""

import argparse
import sys

from llamascope_sdk import DEMO_FEATURE, SAE, Steer, compare_generations, load_model, run_script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--feature", type=int, default=DEMO_FEATURE.index)
    ap.add_argument("--strength", type=float, default=DEMO_FEATURE.strength)
    ap.add_argument("--relative", action="store_true",
                    help="strength in multiples of the feature's typical activation")
    ap.add_argument("--prompt", default=DEMO_FEATURE.prompt)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    args = ap.parse_args()

    sae = SAE.from_pretrained(args.sae)
    model, tokenizer = load_model(args.model)
    steer = Steer(sae, [args.feature], args.strength, positions="all", relative=args.relative)
    result = compare_generations(model, tokenizer, args.prompt, [steer],
                                 max_new_tokens=args.max_new_tokens)
    print("prompt:  ", args.prompt)
    print("baseline:", result.baseline)
    print("steered: ", result.steered)


if __name__ == "__main__":
    sys.exit(run_script(main))
