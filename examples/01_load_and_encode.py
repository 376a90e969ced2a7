"""Read SAE features of a prompt, token by token.

Runs offline on the bundled demo SAE and SmolLM2-135M. For Llama Scope on Llama-3.1-8B:
    python examples/01_load_and_encode.py --sae L15R-8x --model meta-llama/Llama-3.1-8B --device cuda
"""

import argparse
import sys

from llamascope_sdk import SAE, load_model, read_features, run_script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompt", default="To be, or not to be, that is the question.")
    args = ap.parse_args()

    sae = SAE.from_pretrained(args.sae, device=args.device)
    model, tokenizer = load_model(args.model, device=args.device)
    print(sae)

    reading = read_features(model, tokenizer, sae, args.prompt, top_k=3)
    for token, top in zip(reading.tokens, reading.top[sae.name], strict=True):
        feats = ", ".join(f"#{i}={v:.2f}" for i, v in top) or "(special token, skipped)"
        print(f"{token!r:>14}  {feats}")
    l0 = (reading.acts[sae.name] > 0).sum(-1)[1:].float().mean()
    print(f"mean L0 over non-special tokens: {l0:.1f}")


if __name__ == "__main__":
    sys.exit(run_script(main))
