"""Feature mining: one pass over a corpus records, for every feature of one or several SAEs at
once, its top activating contexts, a sample of its firings stratified by activation decile,
random contexts where it does not fire, its statistics (a
:class:`~llamascope_sdk.core.feature_stats.FeatureStats`) and an activation histogram.

Per batch of sequences there is one model forward, stopped after the last layer any SAE needs
(:func:`~llamascope_sdk.loading.capture.capture`); each SAE encodes its input site and
:class:`~llamascope_sdk.mining.state.Tracker` updates its running state (how, and why the
result does not depend on batch order or on the number of processes, is in
:mod:`llamascope_sdk.mining.state`). BOS/EOS/pad/other special tokens and padding count as
"not a token" everywhere.

What is kept per feature (all configurable, see :func:`mine`):

* the ``top_n`` (20) highest activations with a window of ``window_before`` (16) tokens
  before and ``window_after`` (4) after;
* the decile examples: a uniform random sample of ``n_samples`` (100) of the feature's
  firings, sorted by activation and cut into ``deciles`` (10) equal bands, so band d holds
  firings from the d-th decile of its activation distribution (delphi's protocol: 10 per
  decile), each with a context of ``example_context`` (64) tokens (48 before, 15 after);
* the non-activating examples: a pool of ``nonactivating_pool`` (1000) random contexts of the
  corpus (same width), shared by all features, with one bit per feature saying whether it
  fires anywhere in the context; a feature's non-activating examples are up to
  ``n_nonactivating`` (100) of those where it does not;
* sums, firing counts and a histogram over :data:`HIST_EDGES`.

Memory of the running state, per SAE of F features, with W = window_before + 1 + window_after,
C = example_context, S = n_samples, P = nonactivating_pool, B = len(HIST_EDGES) + 1 bins::

    bytes = F * (top_n * (24 + 8 W) + S * (24 + 8 C) + 8 B + 32 + P) + P * (24 + 4 C)

(:func:`state_bytes`; 24 = key, document and position as int64; 8 per window token = int32
token id + float32 activation). For a 131,072-feature Llama Scope SAE with the defaults that
is 57,304 bytes per feature, 7.0 GiB; for the 4,608-feature demo SAE 252 MiB; with
``--samples 20 --example-context 32`` a 131k SAE needs 1.1 GiB. On top of it come per-batch
buffers of O(batch tokens x F) (the batch's activations, as the encode itself needs).

Several processes (``torchrun``): every rank reads and tokenises the whole corpus (so that
every token has the same corpus order everywhere), runs the model only on batches i with
i % world == rank, and the per-rank states are merged with torch.distributed collectives
(:mod:`llamascope_sdk.mining.merge`); the merged result equals one process's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk import corpus as corpus_mod
from llamascope_sdk.base.dist import init_from_env
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.core.sites import Site
from llamascope_sdk.corpus import CorpusSource, ReadCounts, local_paths
from llamascope_sdk.loading.capture import capture, keep_mask
from llamascope_sdk.loading.compat import check_compatible, named_saes
from llamascope_sdk.loading.models import context_window, model_device, special_ids
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.mining.checkpoint import Checkpointer
from llamascope_sdk.mining.merge import merge_trackers
from llamascope_sdk.mining.state import (
    HIST_EDGES,
    Batch,
    Contexts,
    Examples,
    MiningConfig,
    Tracker,
    sample_priority,
    state_bytes,
)

_MAX_ORDER = 2**32 - 1


@dataclass
class MiningResult:
    """What one pass found for one SAE (before logit lens and saving; see
    :class:`~llamascope_sdk.store.feature_store.FeatureStore`)."""

    sae: SAE
    name: str
    top: Examples  # [F, top_n], sorted by activation, earlier (doc, pos) first on ties
    samples: Examples | None  # [F, n_samples], sorted by activation (descending)
    stats: FeatureStats
    hist: torch.Tensor  # [F, len(HIST_EDGES) + 1] int64
    n_tokens: int
    n_docs: int
    contexts: Contexts | None = None  # the pool of random contexts (non-activating examples)
    config: MiningConfig = field(default_factory=MiningConfig)
    read: dict[str, Any] = field(default_factory=dict)  # corpus.ReadCounts.as_dict()


# ---------------------------------------------------------------------------- checks
def _memory_available(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_mining_args(model: Any, saes: Mapping[str, SAE], *, tokens: int, context: int,
                      batch_size: int, cfg: MiningConfig) -> None:
    """Refuse bad arguments of :func:`mine` with one line each, before any work."""
    def bad(msg: str) -> InputError:
        return InputError(msg)

    for name, v, lo in (("tokens", tokens, 1), ("context", context, 2),
                        ("batch_size", batch_size, 1), ("top_n", cfg.top_n, 1),
                        ("n_samples", cfg.n_samples, 0), ("deciles", cfg.deciles, 1),
                        ("example_context", cfg.example_context, 1),
                        ("n_nonactivating", cfg.n_nonactivating, 0),
                        ("nonactivating_pool", cfg.nonactivating_pool, 0),
                        ("window_before", cfg.window_before, 0),
                        ("window_after", cfg.window_after, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise bad(f"{name}={v!r} is not allowed: {name} must be an integer >= {lo}")
    if tokens >= _MAX_ORDER:
        raise bad(f"tokens={tokens} is too many: at most {_MAX_ORDER - 1} per run (the token "
                  "order is a 32-bit key)")
    window = context_window(model)
    if window is not None and context > window:
        raise bad(f"context={context} is longer than the model's window of {window} positions; "
                  f"use context <= {window}")
    if cfg.n_nonactivating > cfg.nonactivating_pool:
        raise bad(f"n_nonactivating={cfg.n_nonactivating} exceeds nonactivating_pool="
                  f"{cfg.nonactivating_pool} (the random contexts it is drawn from); raise the pool")
    need = sum(_bytes(s.d_sae, cfg) for s in saes.values())
    device = next(iter(saes.values())).device
    have = _memory_available(device)
    if have is not None and need > have:
        per = _bytes(max(s.d_sae for s in saes.values()), cfg) / max(1, cfg.top_n)
        raise bad(f"top_n={cfg.top_n}, n_samples={cfg.n_samples} need {need / 2**30:.1f} GiB of "
                  f"mining state (mining.state_bytes), more than the {have / 2**30:.1f} GiB of "
                  f"{device.type} memory here; lower them (about {per / 2**20:.1f} MiB per "
                  "top_n unit)")


def _bytes(d_sae: int, cfg: MiningConfig) -> int:
    return state_bytes(d_sae, cfg.top_n, cfg.window_before + 1 + cfg.window_after,
                       cfg.n_samples, cfg.example_context, cfg.pool)


# ---------------------------------------------------------------------------- mining
def mine(model: Any, tokenizer: Any, saes: SAE | Sequence[SAE] | Mapping[str, SAE],
         corpus: CorpusSource | Iterable[str], *, tokens: int = 100_000, context: int = 256,
         batch_size: int = 8, top_n: int = 20, n_samples: int = 100, deciles: int = 10,
         example_context: int = 64, n_nonactivating: int = 100, nonactivating_pool: int = 1000,
         window_before: int = 16, window_after: int = 4, split: str = "train",
         text_field: str = "text", progress: bool = True, checkpoint_every: int | None = None,
         checkpoint_dir: str | os.PathLike[str] | None = None) -> dict[str, MiningResult]:
    """Mine every feature of ``saes`` in one pass over ``corpus``.

    Args:
        model, tokenizer: as from :func:`~llamascope_sdk.loading.models.load_model`.
        saes: one SAE, several (they share one forward, stopped after the last layer needed)
            or a name -> SAE mapping; R, A, M and TC SAEs.
        corpus: a .txt/.jsonl/.parquet path (comma-separated for several), a Hugging Face
            dataset name (streamed; ``split``, ``text_field``), or an iterable of strings.
        tokens: stop after this many tokens (BOS included).
        context: tokens per sequence: every document is read whole, in consecutive windows
            of BOS + ``context - 1`` tokens (:data:`llamascope_sdk.corpus.RULES` ``"windows"``);
            positions count from the document's start. An example's context stays inside
            its window.
        top_n: contexts kept per feature, with ``window_before``/``window_after`` tokens.
        n_samples, deciles: size of the uniform sample of each feature's firings and the
            number of activation bands it is cut into (the decile examples; 0 for none).
        example_context: tokens of context of a decile or non-activating example.
        n_nonactivating, nonactivating_pool: non-activating contexts per feature, drawn from a
            pool of this many random contexts (0 for none).
        progress: a tqdm bar on stderr.
        checkpoint_every: save the running state (atomically) every this many tokens into
            ``checkpoint_dir``; a later call with the same arguments resumes from it.

    Returns:
        ``{name: MiningResult}``. Ties in activation go to the earlier (document, position).
        Under ``torchrun`` every rank gets the same merged result.

    Raises:
        InputError: a bad argument (one line naming it and what is allowed).
        ValueError: no non-special token in the corpus.
    """
    from tqdm.auto import tqdm


    cfg = MiningConfig(top_n=top_n, window_before=window_before, window_after=window_after,
                       deciles=deciles, n_samples=n_samples, example_context=example_context,
                       n_nonactivating=n_nonactivating, nonactivating_pool=nonactivating_pool)
    named = named_saes(saes)
    check_mining_args(model, named, tokens=tokens, context=context, batch_size=batch_size, cfg=cfg)
    corpus_mod.check_corpus(corpus)  # a missing or unreadable file: one line, before any work
    if checkpoint_every is not None and (checkpoint_every < 1 or checkpoint_dir is None):
        raise InputError(f"checkpoint_every={checkpoint_every!r}: give an integer >= 1 and a "
                         "checkpoint_dir")
    sites: dict[str, Site] = {name: check_compatible(model, sae, name)[0]
                              for name, sae in named.items()}
    dist = init_from_env(model_device(model).type)
    trackers = {name: Tracker(sae.d_sae, cfg, sae.device) for name, sae in named.items()}
    specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)
    ckpt = (Checkpointer(Path(checkpoint_dir), checkpoint_every, dist,
                         run_identity(named, corpus, tokens=tokens, context=context,
                                      batch_size=batch_size, split=split, text_field=text_field,
                                      config=asdict(cfg)))
            if checkpoint_every is not None and checkpoint_dir is not None else None)
    done, n_tokens, n_docs = -1, 0, 0
    if ckpt is not None:
        done, n_tokens, n_docs = ckpt.resume(trackers)
    counts = ReadCounts()
    bar = tqdm(total=tokens, unit="tok", desc="mining", file=sys.stderr,
               disable=not progress or not dist.is_main, dynamic_ncols=True)
    try:
        for i, b in enumerate(corpus_mod.batches(tokenizer, corpus, tokens=tokens, context=context,
                                                 batch_size=batch_size, rule="windows",
                                                 split=split, text_field=text_field,
                                                 counts=counts)):
            ids, valid, length, doc, start, offset = b.ids, b.valid, b.lengths, b.doc, b.pos, b.order
            bar.update(int(length.sum()))
            if i <= done:
                continue
            T = ids.shape[1]
            keep = keep_mask(ids, valid, specials)
            n_tokens += int(keep.sum())
            n_docs = max(n_docs, int(doc.max()) + 1)
            if i % dist.world == dist.rank:
                acts, _ = capture(model, dict.fromkeys(sites.values()), ids, valid)
                order = offset[:, None] + torch.arange(T)[None, :]
                for name, tr in trackers.items():
                    dev = named[name].device
                    batch = Batch(ids.to(dev), keep.to(dev), length.to(dev), doc.to(dev),
                                  start.to(dev), order.to(dev), T)
                    with torch.no_grad():
                        tr.update_sparse(*firings(named[name], acts[sites[name]]), batch)
            if ckpt is not None:
                ckpt.after_batch(i, int(length.sum()), trackers, n_tokens, n_docs)
    finally:
        bar.close()
    if n_tokens == 0:
        raise ValueError("mining: the corpus holds no non-special tokens")
    if dist.world > 1:
        merge_trackers(trackers, dist)
    out = {name: _result(named[name], name, tr, n_tokens, n_docs, cfg)
           for name, tr in trackers.items()}
    for r in out.values():
        r.read = counts.as_dict()
    if ckpt is not None:
        ckpt.finish()
    return out


def firings(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The non-zero activations of ``sae.encode(x)`` over ``x`` [..., D] flattened to rows:
    (row, feature, value), row-major. The same values as ``encode``; for JumpReLU and ReLU
    SAEs without building the dense [rows, F] output (one comparison over the
    pre-activations, then ``nonzero``): ``a * (a > theta) > 0`` is ``a > max(theta, 0)``."""
    x2 = x.reshape(-1, x.shape[-1])
    act = sae.hyperparams.act_fn
    if act in ("jumprelu", "relu"):
        a = sae.pre_acts(x2)
        rows, cols = ((a > sae.gate_threshold().clamp(min=0)) if act == "jumprelu"
                      else (a > 0)).nonzero(as_tuple=True)
        return rows, cols, a[rows, cols]
    f = sae.encode(x2)
    rows, cols = (f > 0).nonzero(as_tuple=True)
    return rows, cols, f[rows, cols]


def _result(sae: SAE, name: str, tr: Tracker, n_tokens: int, n_docs: int,
            cfg: MiningConfig) -> MiningResult:
    stats = FeatureStats.from_sums(tr.total.cpu(), tr.fired.cpu().double(), n_tokens)
    return MiningResult(sae, name, tr.top.examples(by_value=False),
                        tr.samples.examples(by_value=True) if tr.samples is not None else None,
                        stats, tr.hist.view(sae.d_sae, -1).cpu(), n_tokens, n_docs,
                        tr.pool.contexts() if tr.pool is not None else None, cfg)


def run_identity(saes: SAE | Sequence[SAE] | Mapping[str, SAE], corpus: Any,
                 **kwargs: Any) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the SAEs (name, width, site, a checksum of
    the encoder), the corpus (local files: path, size and modification time) and every
    argument of :func:`mine` given in ``kwargs``."""

    if isinstance(corpus, str | os.PathLike):
        paths = local_paths(corpus)
        what: Any = ([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths if p.is_file()]
                     if paths else str(corpus))
    else:
        what = "iterable"  # the caller's strings: assumed the same on a resume
    return {"saes": {n: [s.name, s.d_sae, s.hyperparams.hook_point_in,
                         float(s.W_enc.double().sum())] for n, s in named_saes(saes).items()},
            "corpus": what, "args": {k: kwargs[k] for k in sorted(kwargs)}}


def quantile_bands(n: int, n_bands: int) -> list[tuple[int, int]]:
    """Slot ranges [start, stop) of ``n_bands`` equal bands of an ``n``-slot sorted sample,
    highest band first (fewer bands when n < n_bands)."""
    n_bands = max(1, min(n_bands, n))
    cuts = [round(i * n / n_bands) for i in range(n_bands + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n_bands)]


def memory_report(d_sae: int, **kw: Any) -> str:
    b = state_bytes(d_sae, **kw)
    return f"{d_sae} features: {b / 2**20:.0f} MiB ({b / d_sae / 1024:.1f} KiB per feature)"


__all__ = ["HIST_EDGES", "Examples", "Contexts", "MiningConfig", "MiningResult", "mine",
           "sample_priority", "state_bytes", "quantile_bands", "memory_report",
           "check_mining_args", "run_identity"]
