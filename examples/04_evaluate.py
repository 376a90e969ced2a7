"""Evaluate an SAE on a text file: L0, explained variance, MSE, delta LM loss, KL, dead/dense.

    python examples/04_evaluate.py path/to/text.txt --tokens 4000

The file is a .txt/.jsonl/.parquet of your own (or a Hugging Face dataset name); the SAE and
model default to the offline demo.
"""

import argparse
import json
import sys

from llamascope_sdk import SAE, check_corpus, evaluate, load_model, run_script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset", help="a .txt/.jsonl/.parquet file or a Hugging Face dataset name")
    ap.add_argument("--sae", default="demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--context", type=int, default=256)
    args = ap.parse_args()

    check_corpus(args.dataset)  # a missing file is reported before the model is loaded
    sae = SAE.from_pretrained(args.sae)
    model, tokenizer = load_model(args.model)
    results = evaluate(model, tokenizer, [sae], args.dataset, tokens=args.tokens,
                       context=args.context)
    for name, r in results.items():
        print(name, json.dumps(r.to_dict(), indent=2))


if __name__ == "__main__":
    sys.exit(run_script(main))
