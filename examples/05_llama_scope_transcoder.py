"""Llama Scope on Llama-3.1-8B: a transcoder replacing an MLP (needs the Hub and a GPU).

    HF_TOKEN=... python examples/05_llama_scope_transcoder.py --layer 15 --model meta-llama/Llama-3.1-8B

A transcoder reads the normalised residual stream before the MLP (without the RMSNorm gain) and
predicts the MLP output; splicing it replaces the MLP by the transcoder's sparse features.
"""

import argparse
import sys

import torch

from llamascope_sdk import SAE, attach, load_model, run_script, tokenize


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--width", default="8x")
    ap.add_argument("--model", default="meta-llama/Llama-3.1-8B")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    tc = SAE.from_pretrained(f"L{args.layer}TC-{args.width}", device=args.device, dtype="bfloat16")
    model, tokenizer = load_model(args.model, device=args.device)
    ids = tokenize(tokenizer, "The Eiffel Tower is located in the city of").to(args.device)
    with torch.no_grad():
        clean = model(ids).logits[0, -1].softmax(-1)
        with attach(model, [tc], splice=True, error_term=False) as h:
            spliced = model(ids).logits[0, -1].softmax(-1)
    print(tc.source)
    print("mean L0 :", float((h.features[tc.name][0, 1:] > 0).sum(-1).float().mean()))
    for name, p in (("clean", clean), ("transcoder", spliced)):
        top = p.topk(5)
        print(f"{name:>10}:", [(tokenizer.decode(int(i)), round(float(v), 3))
                               for v, i in zip(top.values, top.indices, strict=True)])


if __name__ == "__main__":
    sys.exit(run_script(main))
