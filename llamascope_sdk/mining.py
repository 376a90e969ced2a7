"""Feature mining: one pass over a corpus records, for every feature of one or several SAEs at
once, its top activating contexts, samples across its activation quantiles, its statistics
(a :class:`~llamascope_sdk.feature_stats.FeatureStats`) and an activation histogram.

How it works, per batch of documents (one model forward, stopped after the last layer any SAE
needs, through :func:`~llamascope_sdk.hooks.hooked`):

* each SAE encodes its input site (the residual/attention/MLP output, or for a transcoder the
  gain-free normalised input ``ln2_normalized``); BOS/EOS/pad/other special tokens
  (:func:`~llamascope_sdk.models.special_ids`) and padding count as "not a token" everywhere;
* statistics are three running [F] sums (activation, firings) and a token count;
* the histogram is a running [F, B] count over fixed log-spaced bins (:data:`HIST_EDGES`),
  filled with one ``bincount`` over the batch's non-zero activations;
* top-N contexts: every token gets a 64-bit key ``(float32 bits of f) << 32 | (2^32-1 - order)``
  where ``order`` is the token's position in the corpus (documents in order, then positions),
  so sorting keys sorts by activation and, on an exact tie, the EARLIER (document, position)
  wins. The running [F, N] keys are concatenated with the batch's per-feature top-N
  candidates and ``topk`` along dim 1 keeps the winners; only features whose batch maximum can
  enter are touched.
* quantile samples: a uniform sample without replacement of each feature's firings, kept the
  same way with the key ``priority(order, feature) << 32 | (2^32-1 - order)`` (a fixed
  integer hash, :func:`sample_priority`; reservoir sampling by random priorities). At the end
  the sample is sorted by activation and cut into equal bands: band q holds firings from the
  q-th quantile range of the feature's activation distribution.
* windows: when an entry wins, its window (``window_before`` tokens before the token,
  ``window_after`` after, inside its own document) is copied from the batch: token ids and the
  feature's activation on every token of the window. So there is no second pass and no
  corpus-sized buffer; the cost is that windows are carried with the state.

State, per SAE (independent of the corpus size), with K = top_n + n_samples slots, W =
window_before + 1 + window_after, B = len(HIST_EDGES) + 1 bins::

    bytes = F * (K * (8 key + 8 doc + 8 pos + W * (8 token id + 4 activation)) + 8 * B + 16)

see :func:`state_bytes`. For a 131,072-feature Llama Scope SAE with the defaults (N=20,
16 samples, W=21, 58 bins) that is 10,416 bytes per feature: 1.37 GB (1,302 MiB), plus
transient per-batch buffers O(batch tokens x F) (the batch's activations, as the encode itself
needs); for the 4,608-feature demo SAE 46 MiB.

No Python loop runs per token or per feature: every step is a tensor op over [F, ...].
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import corpus
from .compat import check_compatible, named_saes
from .corpus import CorpusSource, iter_documents
from .feature_stats import FeatureStats
from .hooks import capture_into, hooked
from .models import model_device, special_ids
from .sae import SAE
from .sites import Site

#: Histogram bin edges (model units): 8 bins per decade from 1e-3 to 1e4. Bin 0 counts
#: 0 < f <= 1e-3, bin i counts edges[i-1] < f <= edges[i], the last bin f > 1e4.
HIST_EDGES = torch.logspace(-3, 4, 57, dtype=torch.float64).float()
_INV = 0xFFFFFFFF
_MAX_ORDER = 2**32 - 1


def sample_priority(order: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random 31-bit priority of each (feature, token): [F, T] int64.

    ``order`` [T] are global token ordinals, ``features`` [F] feature indices. The quantile
    sample of a feature is its firings with the highest priorities (ties impossible: the low
    32 bits of the sample key are the token order).
    """
    x = order.long()[None, :] * 0x5851F42D4C957F2D + features.long()[:, None] * 0x14057B7EF767814F
    x = x ^ (x >> 29)
    x = x * 0x2545F4914F6CDD1D
    x = x ^ (x >> 32)
    return (x >> 8) & 0x7FFFFFFF


def state_bytes(d_sae: int, top_n: int = 20, n_samples: int = 16, window: int = 21,
                n_bins: int = len(HIST_EDGES) + 1) -> int:
    """Bytes of a miner's running state for one SAE (see the module docstring)."""
    k = top_n + n_samples
    return d_sae * (k * (24 + window * 12) + 8 * n_bins + 16)


@dataclass
class Examples:
    """Contexts of a set of features, K per feature (empty slots have ``doc == -1``).

    ``values`` [F, K] activation at the centre token; ``doc``/``pos`` [F, K] where it came
    from (document index in the corpus, token position in the document with BOS at 0);
    ``tokens`` [F, K, W] token ids of the window (-1 outside the document); ``acts`` [F, K, W]
    the feature's activation on every window token (0 at special tokens). The centre is at
    window index ``center``.
    """

    values: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    tokens: torch.Tensor
    acts: torch.Tensor
    center: int

    def select(self, features: torch.Tensor) -> Examples:
        return Examples(self.values[features], self.doc[features], self.pos[features],
                        self.tokens[features], self.acts[features], self.center)


class _Slots:
    """Running K best keys per feature plus where they came from and their windows."""

    def __init__(self, f: int, k: int, w: int, device: torch.device) -> None:
        self.k, self.w = k, w
        self.keys = torch.full((f, k), -1, dtype=torch.long, device=device)
        self.doc = torch.full((f, k), -1, dtype=torch.long, device=device)
        self.pos = torch.full((f, k), -1, dtype=torch.long, device=device)
        self.tok = torch.full((f, k, w), -1, dtype=torch.long, device=device)
        self.act = torch.zeros((f, k, w), dtype=torch.float32, device=device)

    def merge(self, rows: torch.Tensor, cand: torch.Tensor, batch: _Batch, f_BTF: torch.Tensor,
              offsets: torch.Tensor) -> None:
        """Merge candidate keys ``cand`` [R, B*T] (-1 = none) of features ``rows`` [R]."""
        if rows.numel() == 0:
            return
        k = self.k
        kc = min(k, cand.shape[1])
        ck, ci = cand.topk(kc, dim=1)
        allk = torch.cat([self.keys[rows], ck], dim=1)
        top, ti = allk.topk(k, dim=1)
        new = ti >= k
        col = ci.gather(1, (ti - k).clamp(min=0))  # [R, K] batch column of new entries
        old = ti.clamp(max=k - 1)
        b, t = col // batch.T, col % batch.T
        doc = torch.where(new, batch.doc[b], self.doc[rows].gather(1, old))
        pos = torch.where(new, t, self.pos[rows].gather(1, old))
        # Windows of the new entries, read from this batch.
        tw = t[..., None] + offsets  # [R, K, W]
        inside = (tw >= 0) & (tw < batch.length[b][..., None])
        twc = tw.clamp(0, batch.T - 1)
        bw = b[..., None].expand_as(tw)
        tok_new = torch.where(inside, batch.ids[bw, twc], -1)
        flat = (bw * batch.T + twc) * f_BTF.shape[-1] + rows[:, None, None]
        act_new = torch.where(inside, f_BTF.reshape(-1)[flat], 0.0)
        old3 = old[..., None].expand(-1, -1, self.w)
        tok = torch.where(new[..., None], tok_new, self.tok[rows].gather(1, old3))
        act = torch.where(new[..., None], act_new, self.act[rows].gather(1, old3))
        empty = top < 0
        self.keys[rows] = top
        self.doc[rows] = doc.masked_fill(empty, -1)
        self.pos[rows] = pos.masked_fill(empty, -1)
        self.tok[rows] = tok.masked_fill(empty[..., None], -1)
        self.act[rows] = act.masked_fill(empty[..., None], 0.0)

    def examples(self, center: int) -> Examples:
        values = self.act[:, :, center].masked_fill(self.keys < 0, 0.0)
        return Examples(values.cpu(), self.doc.cpu(), self.pos.cpu(), self.tok.cpu(),
                        self.act.cpu(), center)


@dataclass
class _Batch:
    ids: torch.Tensor  # [B, T]
    keep: torch.Tensor  # [B, T] real non-special tokens
    length: torch.Tensor  # [B]
    doc: torch.Tensor  # [B]
    order: torch.Tensor  # [B, T] global token ordinal
    T: int


class _Tracker:
    """Everything mined for one SAE."""

    def __init__(self, sae: SAE, top_n: int, n_samples: int, before: int, after: int,
                 device: torch.device) -> None:
        f = sae.d_sae
        w = before + 1 + after
        self.sae, self.before = sae, before
        self.offsets = torch.arange(-before, after + 1, device=device)
        self.top = _Slots(f, top_n, w, device)
        self.samples = _Slots(f, n_samples, w, device) if n_samples > 0 else None
        self.total = torch.zeros(f, dtype=torch.float64, device=device)
        self.fired = torch.zeros(f, dtype=torch.long, device=device)
        self.edges = HIST_EDGES.to(device)
        self.hist = torch.zeros(f * (len(HIST_EDGES) + 1), dtype=torch.long, device=device)
        self.features = torch.arange(f, device=device)

    def update(self, f_BTF: torch.Tensor, batch: _Batch) -> None:
        f_BTF = (f_BTF.float() * batch.keep[..., None]).contiguous()
        flat = f_BTF.reshape(-1, f_BTF.shape[-1])  # [BT, F]
        fired = flat > 0
        self.total += flat.sum(0, dtype=torch.float64)
        self.fired += fired.sum(0)
        rows_nz, cols_nz = fired.nonzero(as_tuple=True)
        vals = flat[rows_nz, cols_nz]
        nb = len(HIST_EDGES) + 1
        bins = torch.bucketize(vals, self.edges)
        self.hist += torch.bincount(cols_nz * nb + bins, minlength=self.hist.numel())
        inv = (_INV - batch.order.reshape(-1))[None, :]  # [1, BT]
        # Top-N: only features whose batch maximum can beat their current N-th entry.
        bmax = flat.amax(0)
        bkey = (bmax.view(torch.int32).long() << 32) | _INV
        rows = ((bmax > 0) & (bkey >= self.top.keys[:, -1])).nonzero().squeeze(1)
        if rows.numel():
            sub = flat[:, rows].T  # [R, BT]
            cand = torch.where(sub > 0, (sub.view(torch.int32).long() << 32) | inv, -1)
            self.top.merge(rows, cand, batch, f_BTF, self.offsets)
        if self.samples is not None:
            rows = fired.any(0).nonzero().squeeze(1)
            if rows.numel():
                sub = flat[:, rows].T
                pri = sample_priority(batch.order.reshape(-1), rows)
                cand = torch.where(sub > 0, (pri << 32) | inv, -1)
                self.samples.merge(rows, cand, batch, f_BTF, self.offsets)


@dataclass
class MiningResult:
    """What one pass found for one SAE (before logit lens and saving; see
    :class:`~llamascope_sdk.feature_store.FeatureStore`)."""

    sae: SAE
    name: str
    top: Examples  # [F, top_n], sorted by activation, earlier (doc, pos) first on ties
    samples: Examples | None  # [F, n_samples], sorted by activation (descending)
    stats: FeatureStats
    hist: torch.Tensor  # [F, len(HIST_EDGES) + 1] int64
    n_tokens: int
    n_docs: int


def sequences(tokenizer: Any, docs: Iterable[str], *, tokens: int,
              context: int) -> Iterator[tuple[int, int, list[int]]]:
    """(document index, corpus order of its first token, token ids) per document:
    :func:`llamascope_sdk.corpus.sequences` with the ``"first"`` rule."""
    order = 0
    for s in corpus.sequences(tokenizer, docs, context=context, tokens=tokens, rule="first"):
        yield s.doc, order, s.ids
        order += len(s.ids)


def doc_batches(tokenizer: Any, docs: Iterable[str], *, tokens: int, context: int,
                batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids [B, T], lengths [B], doc index [B], order offset [B]) batches:
    :func:`llamascope_sdk.corpus.batches` with the ``"first"`` rule."""
    for b in corpus.batches(tokenizer, docs, tokens=tokens, context=context,
                            batch_size=batch_size, rule="first"):
        yield b.ids, b.lengths, b.doc, b.order


def mine(model: Any, tokenizer: Any, saes: SAE | Sequence[SAE] | Mapping[str, SAE],
         corpus: CorpusSource | Iterable[str], *, tokens: int = 100_000, context: int = 256,
         batch_size: int = 8, top_n: int = 20, n_samples: int = 16, window_before: int = 16,
         window_after: int = 4, split: str = "train", text_field: str = "text",
         progress: bool = True) -> dict[str, MiningResult]:
    """Mine every feature of ``saes`` in one pass over ``corpus``.

    Args:
        model, tokenizer: as from :func:`~llamascope_sdk.models.load_model`.
        saes: one SAE, several (they share one forward, stopped after the last layer needed)
            or a name -> SAE mapping; R, A, M and TC SAEs.
        corpus: a .txt/.jsonl/.parquet path (comma-separated for several), a Hugging Face
            dataset name (streamed; ``split``, ``text_field``), or an iterable of strings.
        tokens: stop after this many tokens (BOS included, like ``token_batches``).
        context: documents are cut to this many tokens (one document per sequence).
        top_n: contexts kept per feature; ``n_samples``: size of the uniform sample of each
            feature's firings that quantile bands are drawn from (0 for none).
        window_before, window_after: tokens kept around each example's token.
        progress: a tqdm bar on stderr.

    Returns:
        ``{name: MiningResult}``. Ties in activation go to the earlier (document, position).

    Raises:
        ValueError: no non-special token in the corpus, or more than 2^32 tokens.
    """
    from tqdm.auto import tqdm

    if tokens >= _MAX_ORDER:
        raise ValueError(f"tokens must be < {_MAX_ORDER} (the token order is a 32-bit key)")
    if top_n < 1 or n_samples < 0 or window_before < 0 or window_after < 0:
        raise ValueError("top_n must be >= 1; n_samples, window_before and window_after >= 0")
    named = named_saes(saes)
    device = model_device(model)
    sites: dict[str, Site] = {}
    for name, sae in named.items():
        site_in, _ = check_compatible(model, sae, name)
        sites[name] = site_in
    trackers = {name: _Tracker(sae, top_n, n_samples, window_before, window_after, sae.device)
                for name, sae in named.items()}
    specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)
    docs = iter_documents(corpus, split=split, text_field=text_field)
    n_tokens, n_docs = 0, 0
    bar = tqdm(total=tokens, unit="tok", desc="mining", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    acts: dict[Site, torch.Tensor] = {}
    hooks = {site: capture_into(acts, site) for site in dict.fromkeys(sites.values())}
    try:
        for ids, length, doc, offset in doc_batches(tokenizer, docs, tokens=tokens,
                                                    context=context, batch_size=batch_size):
            T = ids.shape[1]
            arange = torch.arange(T)
            valid = arange[None, :] < length[:, None]
            keep = valid & ~torch.isin(ids, specials)
            acts.clear()
            with torch.no_grad(), hooked(model, hooks, stop_after_last=True):
                model(input_ids=ids.to(device), attention_mask=valid.long().to(device),
                      use_cache=False)
            for name, tr in trackers.items():
                dev = tr.sae.device
                batch = _Batch(ids.to(dev), keep.to(dev), length.to(dev), doc.to(dev),
                               (offset[:, None] + arange[None, :]).to(dev), T)
                with torch.no_grad():
                    f = tr.sae.encode(acts[sites[name]])
                tr.update(f, batch)
            n_tokens += int(keep.sum())
            n_docs = max(n_docs, int(doc.max()) + 1)
            bar.update(int(length.sum()))
    finally:
        bar.close()
    if n_tokens == 0:
        raise ValueError("mining: the corpus holds no non-special tokens")
    out: dict[str, MiningResult] = {}
    for name, tr in trackers.items():
        samples = None
        if tr.samples is not None:
            s = tr.samples.examples(window_before)
            # Sort the sample by activation (descending; earlier (doc, pos) first on ties).
            order_key = torch.where(s.doc >= 0, s.values, -1.0)
            idx = _sort_examples(order_key, s.doc, s.pos)
            samples = Examples(s.values.gather(1, idx), s.doc.gather(1, idx), s.pos.gather(1, idx),
                               s.tokens.gather(1, idx[..., None].expand_as(s.tokens)),
                               s.acts.gather(1, idx[..., None].expand_as(s.acts)), window_before)
        stats = FeatureStats.from_sums(tr.total.cpu(), tr.fired.cpu().double(), n_tokens)
        out[name] = MiningResult(tr.sae, name, tr.top.examples(window_before), samples, stats,
                                 tr.hist.view(tr.sae.d_sae, -1).cpu(), n_tokens, n_docs)
    return out


def _sort_examples(values: torch.Tensor, doc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Indices [F, K] that sort each row by value descending, then (doc, pos) ascending."""
    i1 = torch.argsort(pos, dim=1, stable=True)
    i2 = torch.argsort(doc.gather(1, i1), dim=1, stable=True)
    idx = i1.gather(1, i2)
    i3 = torch.argsort(values.gather(1, idx), dim=1, descending=True, stable=True)
    return idx.gather(1, i3)


def quantile_bands(n: int, n_bands: int) -> list[tuple[int, int]]:
    """Slot ranges [start, stop) of ``n_bands`` equal bands of an ``n``-slot sorted sample,
    highest band first."""
    n_bands = max(1, min(n_bands, n))
    cuts = [round(i * n / n_bands) for i in range(n_bands + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n_bands)]


def memory_report(d_sae: int, **kw: Any) -> str:
    b = state_bytes(d_sae, **kw)
    return f"{d_sae} features: {b / 2**20:.0f} MiB ({b / d_sae / 1024:.1f} KiB per feature)"


__all__ = ["HIST_EDGES", "Examples", "MiningResult", "mine", "sample_priority", "state_bytes",
           "quantile_bands", "sequences", "doc_batches", "memory_report"]

