"""Splice an SAE's reconstruction into the forward pass and ablate features, measuring the loss.

With the error term the spliced model equals the clean one; without it the loss rises by the
SAE's reconstruction error; ablating the most active features (keeping the error term) changes
only what those features wrote.
"""

import argparse
import sys

import torch

from llamascope_sdk import SAE, Ablate, attach, load_model, run_script, tokenize

TEXT = (
    "The history of the city begins in the Roman period, when a small fort was built on the hill "
    "above the river. In the Middle Ages a market grew around the cathedral, and merchants from "
    "across the region came to trade wool, salt and wine. The old town walls were pulled down in "
    "the nineteenth century to make room for the railway station and the new boulevards."
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default="demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--top", type=int, default=5, help="how many of the most active features to ablate")
    args = ap.parse_args()

    sae = SAE.from_pretrained(args.sae)
    model, tokenizer = load_model(args.model)
    ids = tokenize(tokenizer, TEXT)

    def loss() -> float:
        with torch.no_grad():
            return float(model(ids, labels=ids).loss)

    clean = loss()
    with attach(model, [sae], splice=True, error_term=True):
        with_error = loss()
    with attach(model, [sae], splice=True, error_term=False):
        without_error = loss()
    with attach(model, [sae]) as h, torch.no_grad():
        model(ids)
    top = h.features[sae.name][0].sum(0).topk(args.top).indices.tolist()
    with attach(model, interventions=[Ablate(sae, top, mode="zero")]):
        ablated = loss()

    print(f"clean loss                       {clean:.4f}")
    print(f"spliced, with error term         {with_error:.4f}   (identical by construction)")
    print(f"spliced, reconstruction only     {without_error:.4f}   (delta LM loss {without_error - clean:+.4f})")
    print(f"top-{args.top} features {top} ablated  {ablated:.4f}")


if __name__ == "__main__":
    sys.exit(run_script(main))
