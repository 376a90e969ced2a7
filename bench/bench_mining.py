"""Mining cost against its floor, state memory, and page rendering time.

The floor is what mining cannot avoid: tokenising the corpus into the same batches, the model
forward up to the SAE's layer (stopped there, as mining does) and the SAE encode of every
token. Mining adds the bookkeeping (sums, histogram, top examples, the decile sample, the pool
of random contexts). Both run on SmolLM2-135M on CPU, same corpus, budget, context and batch
size, alternating, ``--runs`` times each; every run is printed and the ratio uses the fastest
of each (the machine is shared). Two SAEs at layer 15: the demo SAE (4,608 features) and a
synthetic 64x SAE (36,864 features, random encoder, threshold set for an L0 of about 64).

    .venv/bin/python bench/bench_mining.py --corpus DIR [--tokens 32768] [--runs 3]

The state and the store grow with what fired (formats 3 and 4, issue 29.4): each run prints
the bytes the state held at the end and the worst case (every feature full, ``state_bytes``);
``--store-sizes 4000,32768`` mines the demo SAE on that many tokens and prints the store's size
on disk without pages (target: 4,000 tokens <= 40 MB; format 3 wrote 40.8 MB there), the
time to load it, and how many pairs of examples of one feature and document are closer than
their window (issue 29.3: 0; 104 pairs of top examples and 8,092 of samples at 32,768 tokens
while the spacing rule's scope was the sequence). Before format 3 the state was
allocated for every slot of every feature (2 GiB at 36,864 features) and at ``--tokens 4096``
mining took 2.4x its floor there.

DIR holds wikitext2-valid.txt (see bench/corpus_files.py; default $LLAMASCOPE_CORPUS).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for bench.corpus_files

from bench.corpus_files import add_corpus_argument, corpus_files  # noqa: E402


def synthetic_sae(demo: Any, width: int, model: Any, tok: Any, path: Path, l0: int = 64) -> Any:
    """A random SAE at the demo's site, ``width`` features, threshold for an L0 of ``l0``."""
    from llamascope_sdk import SAE, corpus
    from llamascope_sdk.core.sites import parse_hook_point
    from llamascope_sdk.loading.capture import capture, keep_mask
    from llamascope_sdk.loading.models import special_ids

    hp = demo.hyperparams.model_copy(update={"d_sae": width, "expansion_factor": width // demo.d_model})
    sae = SAE(hp)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(width, demo.d_model, generator=g) / demo.d_model ** 0.5)
        sae.b_enc.zero_()
        w = torch.randn(width, demo.d_model, generator=g)
        sae.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        sae.b_dec.zero_()
    sae.source.subfolder = f"synthetic-{width}"
    site = parse_hook_point(hp.hook_point_in)
    b = next(iter(corpus.batches(tok, path, tokens=2048, context=256, batch_size=8)))
    acts, _ = capture(model, [site], b.ids, b.valid)
    keep = keep_mask(b.ids, b.valid, torch.tensor(sorted(special_ids(tok))))  # not BOS (norm ~7,000)
    pre = sae.pre_acts(acts[site][keep]).flatten()
    sae.set_threshold(float(pre.topk(l0 * int(keep.sum())).values[-1]))
    return sae


def too_close(ex: Any, gap: int) -> int:
    """Pairs of examples of one feature and document closer than ``gap`` positions, each
    example paired with the next of its feature and document (the spacing rule, issue 29.3:
    0 since it is document-wide)."""
    feat = torch.repeat_interleave(torch.arange(ex.d_sae), ex.counts())
    o = torch.argsort(ex.pos, stable=True)
    o = o[torch.argsort(ex.doc[o], stable=True)]
    o = o[torch.argsort(feat[o], stable=True)]
    f, d, p = feat[o], ex.doc[o], ex.pos[o]
    return int(((f[1:] == f[:-1]) & (d[1:] == d[:-1]) & (p[1:] - p[:-1] < gap)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--widths", default="4608,36864", help="SAE widths (4608 = the demo SAE)")
    ap.add_argument("--store-sizes", default="4000,32768",
                    help="token budgets for the demo store size (comma-separated; '' for none)")
    add_corpus_argument(ap)
    args = ap.parse_args()
    (path,) = corpus_files(args.corpus, "wikitext2-valid.txt")

    from llamascope_sdk import SAE, corpus, load_model
    from llamascope_sdk.core.sites import parse_hook_point
    from llamascope_sdk.loading.capture import capture
    from llamascope_sdk.mining.mine import memory_report, mine, state_bytes
    from llamascope_sdk.store.feature_store import FeatureStore
    from llamascope_sdk.store.pages import write_pages

    model, tok = load_model("smollm2-135m")
    demo = SAE.from_pretrained("demo")
    kw: dict[str, Any] = dict(tokens=args.tokens, context=args.context, batch_size=args.batch_size)
    n_tok = sum(int(b.lengths.sum()) for b in corpus.batches(tok, path, **kw))
    print(f"device: cpu, torch threads {torch.get_num_threads()}; {n_tok:,} tokens of "
          f"{path.name}, context {args.context}, batch {args.batch_size}, {args.runs} runs each")
    res = None
    for width in [int(w) for w in args.widths.split(",")]:
        sae = demo if width == demo.d_sae else synthetic_sae(demo, width, model, tok, path)
        site = parse_hook_point(sae.hyperparams.hook_point_in)

        def floor() -> float:
            t = time.perf_counter()
            with torch.no_grad():
                for b in corpus.batches(tok, path, rule="windows", **kw):
                    acts, _ = capture(model, [site], b.ids, b.valid)  # noqa: B023
                    sae.encode(acts[site])  # noqa: B023
            return time.perf_counter() - t

        def mining() -> tuple[float, Any]:
            t = time.perf_counter()
            out = mine(model, tok, sae, path, progress=False, **kw)[sae.name]  # noqa: B023
            return time.perf_counter() - t, out

        floor()  # warm-up
        t_floor, t_mine = [], []
        for _ in range(args.runs):
            t_floor.append(floor())
            took, res = mining()
            t_mine.append(took)
        tf, tm = min(t_floor), min(t_mine)
        l0 = float(res.stats.frequency.sum())
        print(f"{width:6d} features (L0 {l0:.0f}): floor (forward to layer 15 + encode) runs "
              f"{', '.join(f'{x:.2f}' for x in t_floor)} s; mining runs "
              f"{', '.join(f'{x:.2f}' for x in t_mine)} s")
        pairs = ", ".join(f"{m / f:.2f}x" for m, f in zip(t_mine, t_floor, strict=True))
        print(f"{width:6d} features: mining / floor = {tm / tf:.2f}x fastest/fastest, per run "
              f"{pairs}  (target <= 1.25x); {n_tok / tm:.0f} tok/s mining, {n_tok / tf:.0f} "
              "tok/s floor")
        print(f"{width:6d} features: state held at the end {res.state_bytes / 2**20:.1f} MiB; "
              f"worst case (every feature full) {memory_report(width)}")
    print(f"formula for 131,072 features: {state_bytes(131072) / 2**30:.2f} GiB "
          f"(with --samples 20 --example-context 32: "
          f"{state_bytes(131072, n_samples=20, example_context=32) / 2**30:.2f} GiB)")

    for budget in [int(x) for x in args.store_sizes.split(",") if x.strip()]:
        r = mine(model, tok, demo, path, progress=False, **{**kw, "tokens": budget})[demo.name]
        st = FeatureStore.from_result(r, tok, model=model, sae_spec="demo", corpus=path.name)
        with tempfile.TemporaryDirectory() as tmp:
            folder = st.save(Path(tmp) / "store")
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            t = time.perf_counter()
            FeatureStore.load(folder)
            t_load = time.perf_counter() - t
        n_top, n_s = int(r.top.counts().sum()), int(r.samples.counts().sum()) if r.samples else 0
        print(f"demo store, {budget:,} tokens: {size / 1e6:.1f} MB on disk without pages "
              f"(target at 4,000 tokens <= 40 MB); {n_top:,} top examples, {n_s:,} samples; "
              f"state held at the end {r.state_bytes / 2**20:.1f} MiB; loads in {t_load:.2f} s")
        close_s = too_close(r.samples, r.config.example_context) if r.samples else 0
        print(f"demo store, {budget:,} tokens: {too_close(r.top, r.config.window):,} pairs of "
              f"its {n_top:,} top examples and {close_s:,} of its {n_s:,} samples are of one "
              "feature and document and closer than their window (target 0)")

    res = mine(model, tok, demo, path, progress=False, **kw)[demo.name]
    store = FeatureStore.from_result(res, tok, model=model, sae_spec="demo", corpus=str(path.name))
    feats = (store.stats.frequency > 0).nonzero().squeeze(1).tolist()[:args.pages]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_pages(store, Path(tmp) / "pages", feats)
        tp = time.perf_counter() - t
        t = time.perf_counter()
        store.save(Path(tmp) / "store")
        ts = time.perf_counter() - t
    print(f"pages: {len(feats)} feature pages + index in {tp:.1f} s "
          f"({1000 * tp / max(len(feats), 1):.1f} ms/page); store write {ts:.1f} s")


if __name__ == "__main__":
    main()
