"""A mining run in its own process, for the distributed and kill-and-resume tests.

``python -m tests.mining_worker OUT [--checkpoint-dir D --checkpoint-every N] [--sleep S]``
(or under ``torchrun``): mines the tiny random Llama of conftest with one synthetic SAE over
:data:`DOCS` and, on rank 0, writes every tensor of the result to ``OUT`` (safetensors).
``--sleep`` slows each forward so that a test can kill the run half way. Each rank writes its
pid to ``OUT.pid<rank>``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

DOCS = ["the cat sat on the mat " * 3, "a", "", "hello world, hello again and again",
        "zzzz zzzz zzzz", "the cat sat on the mat", "short", "x" * 70,
        "Mining keeps the top examples of every feature at once.", "end of corpus here",
        "one more document to read " * 4, "and the last one"]
ARGS = dict(tokens=600, context=40, batch_size=2, top_n=4, n_samples=6, deciles=3,
            example_context=7, n_nonactivating=5, nonactivating_pool=20, window_before=3,
            window_after=2)


def build():
    """The tiny Llama of conftest (same seed, same weights) and a synthetic SAE at layer 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import CharTokenizer
    from tests.test_hooks import synthetic_sae

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    tok = CharTokenizer()
    ids = torch.tensor([[1, *tok(DOCS[0] + DOCS[3])["input_ids"]]])  # threshold set on the text
    sae = synthetic_sae(model, ids, 1, "R", d_sae=64, l0=6)
    return model, tok, sae


EVAL_ARGS = dict(tokens=500, context=32, batch_size=2, zero_ablation=True)


def eval_tensors(res) -> dict[str, torch.Tensor]:
    """Every number of an EvalResult (float64 scalars, the L0 summary, frequencies)."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list):
            out[prefix] = torch.tensor(v, dtype=torch.float64)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix] = torch.tensor([v], dtype=torch.float64)

    walk("", res.to_dict(frequencies=True))
    return out


def flatten(res) -> dict[str, torch.Tensor]:
    """Every tensor of a MiningResult, plus its counts, by name."""
    out = {}
    for part in ("top", "samples"):
        e = getattr(res, part)
        for k in ("values", "doc", "pos", "tokens", "acts"):
            out[f"{part}.{k}"] = getattr(e, k)
    for k in ("tokens", "doc", "pos", "order", "fires"):
        out[f"contexts.{k}"] = getattr(res.contexts, k)
    for k in ("mean", "typical", "frequency"):
        out[f"stats.{k}"] = getattr(res.stats, k)
    out["hist"] = res.hist
    out["counts"] = torch.tensor([res.n_tokens, res.n_docs, res.stats.n_tokens])
    return out


def main() -> None:
    from safetensors.torch import save_file

    from llamascope_sdk.base.dist import shutdown
    from llamascope_sdk.mining.mine import mine

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--checkpoint-every", type=int)
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--evaluate", action="store_true", help="evaluate() instead of mine()")
    a = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{a.out}.pid{rank}").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    model, tok, sae = build()
    if a.sleep:
        forward = model.forward

        def slow(*args, **kwargs):
            time.sleep(a.sleep)
            return forward(*args, **kwargs)

        model.forward = slow
    if a.evaluate:
        from llamascope_sdk.evaluation.evaluate import evaluate

        out = eval_tensors(evaluate(model, tok, sae, DOCS, progress=False, **EVAL_ARGS)[sae.name])
    else:
        out = flatten(mine(model, tok, sae, DOCS, progress=False, checkpoint_every=a.checkpoint_every,
                           checkpoint_dir=a.checkpoint_dir, **ARGS)[sae.name])
    if rank == 0:
        save_file({k: v.contiguous() for k, v in out.items()}, a.out)
    shutdown()


if __name__ == "__main__":
    main()
