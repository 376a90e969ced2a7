"""The running state of feature mining, and how one batch of activations updates it.

Per SAE (:class:`Tracker`): three running [F] sums (activation, firings) and a token count;
an activation histogram [F, B] over fixed log-spaced bins (:data:`HIST_EDGES`); the top-N
contexts of every feature; a uniform random sample of each feature's firings (the decile
examples: sorted by activation at the end and cut into deciles); and a pool of random contexts
with the features that fire in each of them (the non-activating examples).

Every entry has a unique 64-bit key (:mod:`~llamascope_sdk.mining.keys`) and each feature keeps
the K largest keys among its firings that the spacing rule keeps (two examples of a feature
from one document at least a window apart: :mod:`~llamascope_sdk.mining.spacing`). A
document's firings are offered once the document is read whole; until then its rows wait in
:class:`~llamascope_sdk.mining.open_docs.OpenDocs`. The kept set therefore does not depend on
the order batches are seen in or on how they are split between processes: merging two states
(:mod:`~llamascope_sdk.mining.merge`) gives exactly the state of one pass over both.

Memory grows with what fired, not with features x slots: examples are rows of one growing
table (:class:`~llamascope_sdk.mining.slots.Slots`), at most K per feature, and the pool keeps
(context, feature) pairs. Per feature the state holds only the sums, the histogram, and per
slot kind a floor and a count (:func:`state_bytes` gives the fixed part and the cost of a kept
example).

The work per batch is proportional to the batch's firings (non-zero activations, about
tokens x L0), not to tokens x features: mining lists the firings straight from the
pre-activations (:func:`llamascope_sdk.mining.mine.firings`: one comparison and a ``nonzero``,
the dense activations are never built), the histogram and counts are ``bincount`` over them,
and only firings whose key beats the current K-th key of their feature (the floor) are
candidates; only entering examples copy their context window, the activations of the window
read from the firings sorted by (feature, row) (:class:`~llamascope_sdk.mining.batch.Firings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamascope_sdk.mining.batch import Batch, Firings
from llamascope_sdk.mining.contexts import POOL_SALT, Contexts, Pool
from llamascope_sdk.mining.keys import INV, key_order, mix, sample_priority
from llamascope_sdk.mining.open_docs import OpenDocs
from llamascope_sdk.mining.slots import Examples, Slots

#: Histogram bin edges (model units): 8 bins per decade from 1e-3 to 1e4. Bin 0 counts
#: 0 < f <= 1e-3, bin i counts edges[i-1] < f <= edges[i], the last bin f > 1e4.
HIST_EDGES = torch.logspace(-3, 4, 57, dtype=torch.float64).float()
N_BINS = len(HIST_EDGES) + 1

_mix = mix  # the name earlier tests import


@dataclass
class MiningConfig:
    """What mining keeps per feature (see :func:`~llamascope_sdk.mining.mine.mine`)."""

    top_n: int = 20
    window_before: int = 16
    window_after: int = 4
    n_samples: int = 100
    deciles: int = 10
    example_context: int = 64
    n_nonactivating: int = 100
    nonactivating_pool: int = 1000

    @property
    def window(self) -> int:
        """Tokens of a top example's window (also the spacing of top examples)."""
        return self.window_before + 1 + self.window_after

    @property
    def example_before(self) -> int:
        """Tokens before the firing token in a decile/non-activating context (3/4 of it)."""
        return (3 * self.example_context) // 4

    @property
    def example_after(self) -> int:
        return self.example_context - 1 - self.example_before

    @property
    def pool(self) -> int:
        return self.nonactivating_pool if self.n_nonactivating > 0 else 0


class Tracker:
    """Everything mined for one SAE."""

    def __init__(self, d_sae: int, cfg: MiningConfig, device: torch.device) -> None:
        f = d_sae
        self.d_sae, self.cfg = f, cfg
        self.top = Slots(f, cfg.top_n, cfg.window_before, cfg.window_after, device)
        self.samples = (Slots(f, cfg.n_samples, cfg.example_before, cfg.example_after, device)
                        if cfg.n_samples > 0 else None)
        self.pool = (Pool(cfg.pool, cfg.example_before, cfg.example_after, device)
                     if cfg.pool > 0 else None)
        self.open = OpenDocs(device)
        self.total = torch.zeros(f, dtype=torch.float64, device=device)
        self.fired = torch.zeros(f, dtype=torch.long, device=device)
        self.hist = torch.zeros(f * N_BINS, dtype=torch.long, device=device)
        self.edges = HIST_EDGES.to(device)

    def update(self, f_BTF: torch.Tensor, batch: Batch) -> None:
        """One batch from its dense activations [B, T, F] (see :meth:`update_sparse`)."""
        flat = f_BTF.reshape(-1, f_BTF.shape[-1])
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        self.update_sparse(rows, cols, flat[rows, cols], batch)

    def update_sparse(self, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                      batch: Batch) -> None:
        """One batch from its firings: flat rows (``b * T + t``, ascending) [n], features [n]
        and activations [n] (> 0); firings on tokens outside ``batch.keep`` are dropped."""
        f = self.d_sae
        m = batch.keep.reshape(-1)[rows]
        rows, cols, vals = rows[m], cols[m], vals[m].float()
        # Sums over the firings in their (row-major) order: the same on every machine and
        # thread count, so a distributed run adds exactly the same per-batch sums.
        self.total += torch.bincount(cols, weights=vals.double(), minlength=f)
        self.fired += torch.bincount(cols, minlength=f)
        self.hist += torch.bincount(cols * N_BINS + torch.bucketize(vals, self.edges),
                                    minlength=self.hist.numel())
        if self.pool is not None:
            self.pool.offer(batch, rows, cols)
        self._settle(*self.open.take(batch, rows, cols, vals, self._useful))

    def _useful(self, cols: torch.Tensor, vals: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Firings that may still be kept (key above their feature's floor in the top
        examples or the sample): the rest of an open document need not be held."""
        inv = INV - order
        m = ((vals.view(torch.int32).long() << 32) | inv) > self.top.floor[cols]
        if self.samples is not None:
            m |= ((mix(order, cols) << 32) | inv) > self.samples.floor[cols]
        return m

    def _settle(self, batch: Batch, rows: torch.Tensor, cols: torch.Tensor,
                vals: torch.Tensor) -> None:
        """Offer the firings of whole documents to the top examples and the sample."""
        if rows.numel() == 0:
            return
        order = batch.order.reshape(-1)[rows]
        inv = INV - order
        firings = Firings(rows, cols, vals, batch.ids.numel())
        self.top.offer(cols, (vals.view(torch.int32).long() << 32) | inv, rows, batch, firings)
        if self.samples is not None:
            self.samples.offer(cols, (mix(order, cols) << 32) | inv, rows, batch, firings)

    def settle(self) -> None:
        """The end of the pass in one process: settle every document still open."""
        self._settle(*self.open.drain())

    def share(self, parts: list[dict[str, torch.Tensor]], world: int, rank: int,
              final: bool) -> None:
        """Under torchrun, from every rank's open rows (``parts``): settle here the documents
        they make whole that are this rank's (see :meth:`OpenDocs.share`)."""
        self._settle(*self.open.share(parts, world, rank, final))

    def nbytes(self) -> int:
        """Bytes the state holds now (tables at their current capacity)."""
        fixed = sum(t.numel() * t.element_size() for t in (self.total, self.fired, self.hist))
        parts = [p for p in (self.top, self.samples, self.pool, self.open) if p is not None]
        return fixed + sum(p.nbytes() for p in parts)

    # ------------------------------------------------------------------ state
    def tensors(self) -> dict[str, torch.Tensor]:
        """The whole state as named tensors (checkpoints and the distributed merge)."""
        out = {"total": self.total, "fired": self.fired, "hist": self.hist}
        out |= {f"top.{k}": v for k, v in self.top.tensors().items()}
        if self.samples is not None:
            out |= {f"samples.{k}": v for k, v in self.samples.tensors().items()}
        if self.pool is not None:
            out |= {f"pool.{k}": v for k, v in self.pool.tensors().items()}
        out |= {f"open.{k}": v for k, v in self.open.tensors().items()}
        return out

    def load(self, t: dict[str, torch.Tensor]) -> None:
        for name in ("total", "fired", "hist"):
            getattr(self, name).copy_(t[name])
        for part in ("top", "samples", "pool", "open"):
            obj = getattr(self, part)
            if obj is not None:
                obj.load({k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(part + ".")})


def state_bytes(d_sae: int, top_n: int = 20, window: int = 21, n_samples: int = 100,
                example_context: int = 64, pool: int = 1000) -> int:
    """The most bytes a miner's running state for one SAE can reach (every feature holding
    ``top_n`` top examples and ``n_samples`` samples; see :func:`example_bytes` for what
    each kept example costs, and :meth:`Tracker.nbytes` for what a state holds)."""
    fixed = d_sae * (8 * N_BINS + 16 + 2 * 16)
    return (fixed + d_sae * (top_n * example_bytes(window) + n_samples * example_bytes(example_context))
            + pool * (24 + example_context * 4))


def example_bytes(window: int) -> int:
    """Bytes of one kept example: key, feature, document, position (int64) and its window
    (int32 token id + float32 activation per token)."""
    return 32 + 8 * window


__all__ = ["HIST_EDGES", "N_BINS", "Examples", "Contexts", "MiningConfig", "Tracker", "Batch",
           "Firings", "sample_priority", "state_bytes", "example_bytes", "key_order",
           "POOL_SALT"]
