"""The rows of documents not yet read whole, held back until they are: what makes the spacing
rule document-wide (:mod:`~llamascope_sdk.mining.spacing`).

Whether a firing is kept depends on the firings of its feature and document with larger keys
(through chains of them, each closer than a window to the next), and a document longer than
one sequence is read in several sequences, which may lie in different batches (a sort pool
orders its sequences by length, so a document's short last window comes before its full ones)
or, under torchrun, on different ranks. So the rows of a document not yet read whole are held
here: their token ids, where they come from, and those of their firings whose key beats the
feature's floor (its K-th key among settled examples) in the top examples or in the sample,
with every other firing of the same feature in the same row (a kept example's window shows
them). Any other firing can never be kept, and it only decides the fate of firings with
smaller keys, which cannot be kept either. A document is read whole when its rows 0..p have all come, p
being the part of the row marked last; its rows are then settled with the batch's others, and
the floors they raise prune the firings still held.

Layout (the checkpoint and the distributed merge carry it as it is): the rows ragged, their
token ids concatenated (``tok``; ``length`` per row), and per row ``doc``, ``start`` (document
position of column 0), ``order0`` (corpus ordinal of column 0), ``part`` and ``last``; the
firings held as ``frow`` (held row), ``ft`` (column), ``fcol`` (feature), ``fval``
(activation). Memory: the held rows' ids and their useful firings (28 bytes each), at most the
rows of the documents open at once: in one process those of one sort pool (16 batches) and of
a document longer than that (mining the demo on 32,768 WikiText tokens: at most 57 rows and
454,617 firings, 12.3 MiB). Every batch joins the held rows to its own once (concatenations
and one filter), so its extra work grows with what is held, not with what was read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from llamascope_sdk.mining.batch import Batch

__all__ = ["OpenDocs", "Useful"]

#: ``useful(feature, value, order)`` -> bool mask: may this firing still be kept?
Useful = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_LONG = ("tok", "length", "doc", "start", "order0", "part", "frow", "ft", "fcol")


def whole(doc: torch.Tensor, part: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """bool [R]: is row r's document read whole by the rows given (parts 0..p all present, p
    the part of its row marked last)? Every (doc, part) appears at most once."""
    if doc.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=doc.device)
    _, inv = torch.unique(doc, return_inverse=True)
    n = int(inv.max()) + 1
    count = torch.bincount(inv, minlength=n)
    need = torch.zeros(n, dtype=torch.long, device=doc.device)
    need.scatter_reduce_(0, inv, torch.where(last, part + 1, 0), reduce="amax")
    return (need == count)[inv]


class OpenDocs:
    """The held rows and firings of the documents still open (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t = self._empty()

    def _empty(self) -> dict[str, torch.Tensor]:
        t = {n: torch.zeros(0, dtype=torch.long, device=self.device) for n in _LONG}
        t["last"] = torch.zeros(0, dtype=torch.bool, device=self.device)
        t["fval"] = torch.zeros(0, dtype=torch.float32, device=self.device)
        return t

    @property
    def rows(self) -> int:
        return int(self.t["length"].numel())

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.t.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The held rows and firings (checkpoints and the distributed merge)."""
        return dict(self.t)

    def load(self, t: dict[str, torch.Tensor]) -> None:
        """Replace what is held by ``t`` (as from :meth:`tensors`; nothing when empty)."""
        self.t = {n: t[n].to(self.device) for n in self.t} if t else self._empty()

    def take(self, batch: Batch, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
             useful: Useful) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's rows joined with the held ones: returns the rows of every document now
        read whole, as a batch with its firings (flat rows ``b * T + t``, features, values),
        and holds the others with their useful firings. A batch without ``part``/``last``
        (every document whole in it) passes through, as does one whose documents all are when
        nothing is held."""
        if batch.part is None or batch.last is None:
            return batch, rows, cols, vals
        if self.rows == 0 and bool(whole(batch.doc, batch.part, batch.last).all()):
            return batch, rows, cols, vals
        s, t = self.t, batch.T
        inside = torch.arange(t, device=batch.ids.device)[None, :] < batch.length[:, None]
        row = {"tok": torch.cat([s["tok"], batch.ids[inside].long()]),
               "length": torch.cat([s["length"], batch.length.long()]),
               "doc": torch.cat([s["doc"], batch.doc.long()]),
               "start": torch.cat([s["start"], batch.start.long()]),
               "order0": torch.cat([s["order0"], batch.order[:, 0].long()]),
               "part": torch.cat([s["part"], batch.part.long()]),
               "last": torch.cat([s["last"], batch.last.bool()])}
        fire = {"frow": torch.cat([s["frow"], rows // t + self.rows]),
                "ft": torch.cat([s["ft"], rows % t]), "fcol": torch.cat([s["fcol"], cols]),
                "fval": torch.cat([s["fval"], vals.float()])}
        done = whole(row["doc"], row["part"], row["last"])
        self.t = self._select(row, fire, ~done)
        f = self.t
        keep = useful(f["fcol"], f["fval"], f["order0"][f["frow"]] + f["ft"])
        # A kept example's window shows every activation of its feature in its row, useful
        # or not: hold every firing of a (row, feature) that has a useful one.
        pair = f["frow"] * (int(f["fcol"].max()) + 1 if keep.numel() else 1) + f["fcol"]
        keep = torch.isin(pair, pair[keep])
        self.t |= {n: f[n][keep] for n in ("frow", "ft", "fcol", "fval")}
        return _as_batch(self._select(row, fire, done))

    def drain(self) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every held row, as a batch with its firings (the end of the pass in one process:
        nothing more is read); nothing is held afterwards."""
        s = self.t
        self.t = self._empty()
        return _as_batch(self._select(*_split(s), torch.ones_like(s["last"])))

    def share(self, parts: list[dict[str, torch.Tensor]], world: int, rank: int, final: bool
              ) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Under torchrun: ``parts`` are every rank's held rows (as :meth:`tensors`, in rank
        order, this rank's among them). Returns, as a batch with its firings, the rows of the
        documents they make whole (every document with ``final``, at the end of the pass)
        that this rank settles, those with ``doc % world == rank``; afterwards this rank
        holds only its own rows of the documents still open. So each document is settled
        whole on exactly one rank, and no row is held twice."""
        dev = self.device
        n = [int(p["length"].numel()) for p in parts]
        shift = torch.tensor([0, *n], device=dev).cumsum(0)
        s = {k: torch.cat([p[k].to(dev) for p in parts]) for k in self.t}
        s["frow"] = torch.cat([p["frow"].to(dev) + shift[i] for i, p in enumerate(parts)])
        row, fire = _split(s)
        done = torch.ones_like(s["last"]) if final else whole(s["doc"], s["part"], s["last"])
        own = torch.zeros_like(done)
        own[int(shift[rank]):int(shift[rank + 1])] = True
        self.t = self._select(row, fire, ~done & own)
        return _as_batch(self._select(row, fire, done & (s["doc"] % world == rank)))

    @staticmethod
    def _select(row: dict[str, torch.Tensor], fire: dict[str, torch.Tensor],
                pick: torch.Tensor) -> dict[str, torch.Tensor]:
        """The picked rows (bool [R]) with their firings, the firings' rows renumbered."""
        tok_pick = torch.repeat_interleave(pick, row["length"])
        out = {n: v[pick] for n, v in row.items() if n != "tok"}
        out["tok"] = row["tok"][tok_pick]
        new = torch.cumsum(pick.long(), 0) - 1
        m = pick[fire["frow"]]
        out |= {n: v[m] for n, v in fire.items()}
        out["frow"] = new[out["frow"]]
        return out


def _split(t: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Held tensors as (per-row, per-firing) dicts."""
    return ({k: t[k] for k in ("tok", "length", "doc", "start", "order0", "part", "last")},
            {k: t[k] for k in ("frow", "ft", "fcol", "fval")})


def _as_batch(t: dict[str, torch.Tensor]) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held rows (as :meth:`OpenDocs._select` gives them) as a padded batch of whole documents
    and its firings (flat rows, features, values)."""
    length = t["length"]
    dev = length.device
    width = max(int(length.max()) if length.numel() else 0, 1)
    inside = torch.arange(width, device=dev)[None, :] < length[:, None]
    ids = torch.zeros((len(length), width), dtype=torch.long, device=dev)
    ids[inside] = t["tok"]
    order = t["order0"][:, None] + torch.arange(width, device=dev)[None, :]
    batch = Batch(ids, inside, length, t["doc"], t["start"], order, width)
    return batch, t["frow"] * width + t["ft"], t["fcol"], t["fval"]
