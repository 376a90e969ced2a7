"""A distributed mining run whose rank 1 differs from rank 0 in one thing, for
tests/test_mining_ranks.py.

``torchrun ... -m tests.mining_mismatch_worker OUT CORPUS OTHER_CORPUS --differ WHAT`` mines
the tiny model of :mod:`tests.mining_worker`; rank 1 changes ``WHAT``:

- ``tokens``: another token budget;
- ``corpus``: another corpus file (``OTHER_CORPUS``);
- ``sae``: an SAE with other weights (the same shapes);
- ``middle``: the corpus as a list of strings (no file identity), one document changed in the
  middle: only the digest of the tokens read tells it;
- ``nothing``: the same job on both ranks.

Each rank writes ``OUT.forward<rank>`` at its first model forward (so a test sees whether any
model work ran) and rank 0 writes ``OUT`` when mining finished.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from tests.mining_worker import ARGS, DOCS, build


def main() -> None:
    from safetensors.torch import save_file

    from llamascope_sdk.base.dist import shutdown
    from llamascope_sdk.mining.mine import mine
    from tests.mining_worker import flatten

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("corpus")
    ap.add_argument("other")
    ap.add_argument("--differ", default="nothing")
    a = ap.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    model, tok, sae = build()
    forward = model.forward

    def marked(*args, **kwargs):
        Path(f"{a.out}.forward{rank}").touch()
        return forward(*args, **kwargs)

    model.forward = marked
    args = dict(ARGS)
    corpus: object = a.corpus
    if rank == 1 and a.differ == "tokens":
        args["tokens"] = ARGS["tokens"] - 100
    if rank == 1 and a.differ == "corpus":
        corpus = a.other
    if rank == 1 and a.differ == "sae":
        with torch.no_grad():
            sae.W_enc.mul_(1.5)
    if a.differ == "middle":
        docs = list(DOCS)
        if rank == 1:
            docs[5] = docs[5].replace("cat", "dog")
        corpus = docs
    try:
        res = mine(model, tok, sae, corpus, progress=False, **args)[sae.name]
        if rank == 0:
            save_file({k: v.contiguous() for k, v in flatten(res).items()}, a.out)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
