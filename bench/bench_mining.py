"""Mining throughput against the bare model forward, state memory, and page rendering time.

SmolLM2-135M on CPU with the demo SAE (4,608 features, every one tracked), on the same
documents, token budget and batch size. The bare forward is the full model (all 30 layers and
the unembedding) on pre-tokenised batches; mining includes tokenisation, the forward up to the
SAE's layer, the encode and all bookkeeping. Each is run twice, alternating, and the faster run
of each is kept (the machine is shared).

    .venv/bin/python bench/bench_mining.py --corpus DIR [--tokens 8192]

DIR holds wikitext2-valid.txt (see bench/corpus_files.py; default $LLAMASCOPE_CORPUS).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench.corpus_files

from bench.corpus_files import add_corpus_argument, corpus_files  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--pages", type=int, default=1000)
    add_corpus_argument(ap)
    args = ap.parse_args()
    (path,) = corpus_files(args.corpus, "wikitext2-valid.txt")

    from llamascope_sdk import SAE, load_model
    from llamascope_sdk.corpus import iter_documents
    from llamascope_sdk.feature_store import FeatureStore
    from llamascope_sdk.mining import _Tracker, doc_batches, memory_report, mine, state_bytes
    from llamascope_sdk.pages import write_pages

    model, tok = load_model("smollm2-135m")
    sae = SAE.from_pretrained("demo")
    docs = list(iter_documents(path))
    kw = dict(tokens=args.tokens, context=args.context, batch_size=args.batch_size)
    batches = list(doc_batches(tok, docs, **kw))
    n_tok = sum(int(b[1].sum()) for b in batches)

    def bare() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for ids, length, _, _ in batches:
                valid = (torch.arange(ids.shape[1])[None] < length[:, None]).long()
                model(input_ids=ids, attention_mask=valid, use_cache=False)
        return time.perf_counter() - t

    def mining() -> tuple[float, object]:
        t = time.perf_counter()
        res = mine(model, tok, sae, docs, progress=False, **kw)[sae.name]
        return time.perf_counter() - t, res

    bare()  # warm-up
    t_bare, t_mine, res = [], [], None
    for _ in range(2):
        t_bare.append(bare())
        took, res = mining()
        t_mine.append(took)
    tb, tm = min(t_bare), min(t_mine)
    print(f"device: cpu, torch threads {torch.get_num_threads()}; {n_tok:,} tokens in "
          f"{len(batches)} batches of <= {args.batch_size} x {args.context}")
    print(f"bare full forward : {n_tok / tb:8.1f} tok/s  (runs {', '.join(f'{x:.1f}' for x in t_bare)} s)")
    print(f"mining (4608 feat): {n_tok / tm:8.1f} tok/s  (runs {', '.join(f'{x:.1f}' for x in t_mine)} s)")
    print(f"ratio mining / bare forward throughput: {tb / tm:.2f}x  (target >= 0.8x)")

    tr = _Tracker(sae, 20, 16, 16, 4, torch.device("cpu"))
    measured = sum(t.numel() * t.element_size() for t in
                   (tr.top.keys, tr.top.doc, tr.top.pos, tr.top.tok, tr.top.act,
                    tr.samples.keys, tr.samples.doc, tr.samples.pos, tr.samples.tok,
                    tr.samples.act, tr.total, tr.fired, tr.hist))
    print(f"state memory (formula): {memory_report(sae.d_sae)}; measured tensors: "
          f"{measured / 2**20:.1f} MiB; formula for 131,072 features: "
          f"{state_bytes(131072) / 2**30:.2f} GiB")

    store = FeatureStore.from_result(res, tok, model=model, sae_spec="demo", corpus=str(path.name))
    feats = (store.stats.frequency > 0).nonzero().squeeze(1).tolist()[:args.pages]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_pages(store, Path(tmp) / "pages", feats)
        tp = time.perf_counter() - t
        t = time.perf_counter()
        store.save(Path(tmp) / "store")
        ts = time.perf_counter() - t
    print(f"pages: {len(feats)} feature pages + index in {tp:.1f} s ({1000 * tp / max(len(feats), 1):.1f} ms/page); "
          f"store write {ts:.1f} s")


if __name__ == "__main__":
    main()
