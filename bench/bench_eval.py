"""Evaluation throughput relative to the bare model forward on the same tokens.

    python bench/bench_eval.py --corpus DIR [--tokens 384] [--context 128] [--repeats 2]

DIR holds wikitext2-valid.txt (see bench/corpus_files.py; default $LLAMASCOPE_CORPUS).
Runs SmolLM2-135M on CPU over its first tokens and
times: the bare forward; ``evaluate`` with 1 synthetic SAE; with 3 synthetic SAEs (R, M and a
transcoder, d_sae = 4608). ``evaluate`` does one clean forward plus one spliced forward per SAE,
but a spliced pass resumes at the SAE's layer, so the "layer-floor" column is
1 + sum((n_layers - L) / n_layers); the rest is embeddings and lm_head per pass, SAE
encode/decode and the log-softmax over the 49,152-token vocabulary. Prints a table; asserts
nothing. About 1-2 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench.corpus_files and tests.helpers

from bench.corpus_files import add_corpus_argument, corpus_files  # noqa: E402
from llamascope_sdk import SAE  # noqa: E402
from llamascope_sdk.core.sites import parse_hook_point  # noqa: E402
from llamascope_sdk.evaluation.evaluate import evaluate  # noqa: E402
from llamascope_sdk.loading.models import load_model, tokenize  # noqa: E402
from tests.helpers import raw_tensors, release_hyperparams  # noqa: E402


def layer_of(sae: SAE) -> int:
    return parse_hook_point(sae.hyperparams.hook_point_out).layer


def token_ids(tok, corpus: Path, n_seq: int, context: int) -> torch.Tensor:
    text = corpus.read_text(encoding="utf-8")[: n_seq * context * 8]
    ids = tokenize(tok, text, prepend_bos=False)[0]
    rows = ids[: n_seq * (context - 1)].reshape(n_seq, context - 1)
    bos = torch.full((n_seq, 1), tok.bos_token_id, dtype=torch.long)
    return torch.cat([bos, rows], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    add_corpus_argument(ap)
    args = ap.parse_args()
    (corpus,) = corpus_files(args.corpus, "wikitext2-valid.txt")
    model, tok = load_model("smollm2-135m")
    ids = token_ids(tok, corpus, max(1, args.tokens // args.context), args.context)
    n_tok = ids.numel()
    saes = [SAE.from_raw(release_hyperparams(d_model=576, d_sae=4608, layer=layer, position=pos,
                                             norm_in=24.0 if pos == "TC" else 5.0, norm_out=2.0),
                         raw_tensors(576, 4608, seed=layer))
            for layer, pos in ((10, "R"), (14, "M"), (20, "TC"))]
    batch = ids.shape[0]

    @torch.inference_mode()
    def bare() -> None:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)

    def run(k: int):
        return lambda: evaluate(model, tok, saes[:k], ids, tokens=n_tok, context=args.context,
                                batch_size=batch, progress=False)

    n_layers = model.config.num_hidden_layers
    runs = {"bare forward": (bare, 1.0)}
    for k in (1, 3):
        # A spliced pass resumes at the SAE's layer: it runs (n_layers - L) / n_layers of a pass.
        floor = 1 + sum((n_layers - layer_of(s)) / n_layers
                        for s in saes[:k])
        runs[f"evaluate, {k} SAE{'s' if k > 1 else ''}"] = (run(k), floor)
    bare()  # warm-up
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeats):  # interleaved, so a burst of load on a shared machine hits all
        for name, (fn, _floor) in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    t_bare = best["bare forward"]
    print(f"SmolLM2-135M, CPU ({torch.get_num_threads()} threads), {n_tok} tokens "
          f"({batch} x {args.context}), best of {args.repeats}; SAEs at layers "
          f"{', '.join(str(layer_of(s)) for s in saes)} of {n_layers}")
    print(f"{'run':<22}{'seconds':>9}{'tokens/s':>10}{'x bare':>8}{'layer-floor':>13}")
    for name, (_fn, floor) in runs.items():
        t = best[name]
        print(f"{name:<22}{t:>9.2f}{n_tok / t:>10.0f}{t / t_bare:>8.2f}{floor:>13.2f}")


if __name__ == "__main__":
    main()
