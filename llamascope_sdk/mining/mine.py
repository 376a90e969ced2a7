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
  corpus (same width), shared by all features, with the features that fire anywhere in each
  context; a feature's non-activating examples are up to ``n_nonactivating`` (100) of those
  where it does not;
* sums, firing counts and a histogram over :data:`HIST_EDGES`.

Spacing (:mod:`~llamascope_sdk.mining.spacing`): two top examples of a feature from one
document are at least ``window_before + 1 + window_after`` positions apart, two decile samples
at least ``example_context``, across the document's sequences too; the kept set is exactly the
greedy (best) spaced set, so the examples never show overlapping windows of one passage. The
rows of a document not yet read whole are held until it is
(:mod:`~llamascope_sdk.mining.open_docs`).

Memory of the running state grows with what fired (:mod:`~llamascope_sdk.mining.slots`):
per SAE of F features, with B = len(HIST_EDGES) + 1 bins, a fixed ``F * (8 B + 48)`` bytes
(sums, histogram, a floor and a count per slot kind), plus ``32 + 8 W`` bytes per kept top
example (W = window) and ``32 + 8 C`` per kept sample (C = example_context), plus the pool
(``P * (24 + 4 C)`` and 16 bytes per (context, firing feature) pair). A feature keeps at most
``top_n`` and ``n_samples`` of them, so :func:`state_bytes` (every feature full: 57 KB per
feature with the defaults) is the most it can reach; a short run or a sparse SAE holds far
less (``bench/bench_mining.py`` prints both). On top of it come per-batch buffers of
O(batch tokens x F) (the batch's activations, as the encode itself needs).

Several processes (``torchrun``): every rank reads and tokenises the whole corpus (so that
every token has the same corpus order everywhere), runs the model only on batches i with
i % world == rank, and the per-rank states are merged with torch.distributed collectives
(:mod:`llamascope_sdk.mining.merge`; the documents split between ranks are settled whole on
one rank, every sort pool of batches and at the end); the merged result equals one
process's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from llamascope_sdk.mining.agreement import (
    TokenDigest,
    check_same_job,
    check_same_tokens,
    iter_digest,
    job_identity,
)
from llamascope_sdk.mining.checkpoint import Checkpointer
from llamascope_sdk.mining.merge import merge_trackers, share_open
from llamascope_sdk.mining.state import (
    HIST_EDGES,
    Batch,
    Contexts,
    Examples,
    MiningConfig,
    Tracker,
    example_bytes,
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
    state_bytes: int = 0  # bytes the running state held at the end (Tracker.nbytes)


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
    need = sum(_bytes(s.d_sae, cfg, tokens) for s in saes.values())
    device = next(iter(saes.values())).device
    have = _memory_available(device)
    if have is not None and need > have:
        per = sum(s.d_sae for s in saes.values()) * example_bytes(cfg.window)
        raise bad(f"top_n={cfg.top_n}, n_samples={cfg.n_samples} may need up to "
                  f"{need / 2**30:.1f} GiB of mining state (mining.state_bytes), more than the "
                  f"{have / 2**30:.1f} GiB of {device.type} memory here; lower them (about "
                  f"{per / 2**20:.1f} MiB per top_n unit)")


def _bytes(d_sae: int, cfg: MiningConfig, tokens: int) -> int:
    """The most state one SAE can need: every feature full, but never more examples per
    feature than tokens read."""
    return state_bytes(d_sae, min(cfg.top_n, tokens), cfg.window, min(cfg.n_samples, tokens),
                       cfg.example_context, cfg.pool)


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
    cfg = MiningConfig(top_n=top_n, window_before=window_before, window_after=window_after,
                       deciles=deciles, n_samples=n_samples, example_context=example_context,
                       n_nonactivating=n_nonactivating, nonactivating_pool=nonactivating_pool)
    named = named_saes(saes)
    check_mining_args(model, named, tokens=tokens, context=context, batch_size=batch_size, cfg=cfg)
    corpus_mod.check_corpus(corpus)  # a missing or unreadable file: one line, before any work
    if checkpoint_every is not None and (checkpoint_every < 1 or checkpoint_dir is None):
        raise InputError(f"checkpoint_every={checkpoint_every!r}: give an integer >= 1 and a "
                         "checkpoint_dir")
    args = dict(tokens=tokens, context=context, batch_size=batch_size, split=split,
                text_field=text_field, config=asdict(cfg))
    identity = run_identity(named, corpus, **args) if checkpoint_every is not None else {}
    run = _Run.start(model, tokenizer, named, cfg, checkpoint_every, checkpoint_dir, identity,
                     lambda: job_identity(named, corpus,
                                          {**args, "checkpoint_every": checkpoint_every}))
    counts = ReadCounts()
    stream = iter_digest(corpus_mod.batches(tokenizer, corpus, tokens=tokens, context=context,
                                            batch_size=batch_size, rule="windows", split=split,
                                            text_field=text_field, counts=counts), run.digest)
    run.read(stream, tokens, progress)
    return run.finish(counts)


@dataclass
class _Run:
    """One mining run's moving parts: the SAEs and their sites, their trackers, the process
    group, the checkpointer, and the counts so far."""

    model: Any
    named: dict[str, SAE]
    sites: dict[str, Site]
    trackers: dict[str, Tracker]
    specials: torch.Tensor
    dist: Any
    ckpt: Checkpointer | None
    cfg: MiningConfig
    done: int = -1
    n_tokens: int = 0
    n_docs: int = 0
    digest: TokenDigest = field(default_factory=TokenDigest)  # every token id read

    @classmethod
    def start(cls, model: Any, tokenizer: Any, named: dict[str, SAE], cfg: MiningConfig,
              every: int | None, folder: str | os.PathLike[str] | None,
              identity: dict[str, Any], job: Callable[[], dict[str, Any]]) -> _Run:
        """Sites checked, every rank running the same ``job()`` (or all stop here, before any
        forward), trackers made, and the newest checkpoint resumed (if any)."""
        sites = {name: check_compatible(model, sae, name)[0] for name, sae in named.items()}
        dist = init_from_env(model_device(model).type)
        if dist.world > 1:
            check_same_job(job(), dist, model_device(model))
        trackers = {name: Tracker(sae.d_sae, cfg, sae.device) for name, sae in named.items()}
        specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long)
        ckpt = (Checkpointer(Path(folder), every, dist, identity)
                if every is not None and folder is not None else None)
        run = cls(model, named, sites, trackers, specials, dist, ckpt, cfg)
        if ckpt is not None:
            run.done, run.n_tokens, run.n_docs = ckpt.resume(trackers)
        return run

    def read(self, stream: Iterable[Any], tokens: int, progress: bool) -> None:
        """The pass: every batch counted, this rank's batches mined, checkpoints saved."""
        from tqdm.auto import tqdm

        bar = tqdm(total=tokens, unit="tok", desc="mining", file=sys.stderr,
                   disable=not progress or not self.dist.is_main, dynamic_ncols=True)
        try:
            for i, b in enumerate(stream):
                bar.update(int(b.lengths.sum()))
                if i > self.done:
                    self.step(i, b)
        finally:
            bar.close()

    def step(self, i: int, b: Any) -> None:
        """Batch ``i``: counted on every rank (token order, documents), mined on its rank."""
        ids, T = b.ids, b.ids.shape[1]
        keep = keep_mask(ids, b.valid, self.specials)
        self.n_tokens += int(keep.sum())
        self.n_docs = max(self.n_docs, int(b.doc.max()) + 1)
        if i % self.dist.world == self.dist.rank:
            acts, _ = capture(self.model, dict.fromkeys(self.sites.values()), ids, b.valid)
            order = b.order[:, None] + torch.arange(T)[None, :]
            for name, tr in self.trackers.items():
                dev = self.named[name].device
                batch = Batch(ids.to(dev), keep.to(dev), b.lengths.to(dev), b.doc.to(dev),
                              b.pos.to(dev), order.to(dev), T, b.part.to(dev), b.last.to(dev))
                with torch.no_grad():
                    tr.update_sparse(*firings(self.named[name], acts[self.sites[name]]), batch)
        if self.dist.world > 1 and (i + 1) % corpus_mod.SORT_POOL == 0:
            share_open(self.trackers, self.dist)  # documents split between ranks, settled
        if self.ckpt is not None:
            self.ckpt.after_batch(i, int(b.lengths.sum()), self.trackers, self.n_tokens,
                                  self.n_docs)

    def finish(self, counts: ReadCounts) -> dict[str, MiningResult]:
        """The ranks' states merged, the results built, the checkpoints removed."""
        if self.n_tokens == 0:
            raise ValueError("mining: the corpus holds no non-special tokens")
        if self.dist.world > 1:
            check_same_tokens(self.digest, self.n_tokens, self.dist, model_device(self.model))
            merge_trackers(self.trackers, self.dist)
        else:
            for tr in self.trackers.values():
                tr.settle()
        out = {name: _result(self.named[name], name, tr, self.n_tokens, self.n_docs, self.cfg)
               for name, tr in self.trackers.items()}
        for r in out.values():
            r.read = counts.as_dict()
        if self.ckpt is not None:
            self.ckpt.finish()
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
    held = tr.nbytes()
    return MiningResult(sae, name, tr.top.examples(by_value=False),
                        tr.samples.examples(by_value=True) if tr.samples is not None else None,
                        stats, tr.hist.view(sae.d_sae, -1).cpu(), n_tokens, n_docs,
                        tr.pool.contexts() if tr.pool is not None else None, cfg,
                        state_bytes=held)


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
