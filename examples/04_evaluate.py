"""Evaluate an SAE on a text file: L0, explained variance, MSE, delta LM loss, KL, dead/dense.

    python examples/04_evaluate.py path/to/text.txt --tokens 4000
"""

import argparse
import json

from llamascope_sdk import SAE, load_model
from llamascope_sdk.demo import DEMO_MODEL, DEMO_SAE_DIR
from llamascope_sdk.evaluation import evaluate

ap = argparse.ArgumentParser()
ap.add_argument("dataset", help="a .txt/.jsonl/.parquet file or a Hugging Face dataset name")
ap.add_argument("--sae", default=str(DEMO_SAE_DIR))
ap.add_argument("--model", default=DEMO_MODEL)
ap.add_argument("--tokens", type=int, default=4000)
ap.add_argument("--context", type=int, default=256)
args = ap.parse_args()

sae = SAE.from_pretrained(args.sae)
model, tokenizer = load_model(args.model)
results = evaluate(model, tokenizer, [sae], args.dataset, tokens=args.tokens, context=args.context)
for name, r in results.items():
    print(name, json.dumps(r.to_dict(), indent=2))
