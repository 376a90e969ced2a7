"""The spacing rule of mined examples: a feature's examples never show overlapping windows.

Rule (stored in a store's metadata as ``"example_spacing"``, ``"scope": "document"``): two
examples of one feature (two top examples, or two decile samples) from the same DOCUMENT lie
at least one window apart in document positions, ``|pos_a - pos_b| >= W`` with W the
example's window (``window_before + 1 + window_after`` for top examples, ``example_context``
for decile samples), whether they lie in one sequence or in two windows of the document
(a document longer than one sequence is read in consecutive windows, see
:data:`llamascope_sdk.corpus.RULES`). So no two examples of a feature show the same token of
the corpus, and none show the same passage on either side of a window's edge. A window's
content still stops at its sequence's edges (what the model saw). Stores mined before this
rule say ``"scope": "sequence"``: there only examples of one sequence were spaced.

Which examples survive is the greedy choice by key, which is exact: take the firing with the
highest key (the activation for top examples, the random priority for the sample), drop every
firing of the same document closer than W to it, take the highest remaining one, and so on.
The result is the lexicographically best set of pairwise spaced firings (its keys, sorted,
are larger than those of any other spaced set at the first place they differ); the first N
of it are the top-N. Because the keys decide alone (ties impossible: a key ends with the
token's corpus order), a firing's fate depends only on firings of its (feature, document)
with larger keys. Two consequences make mining exact at the cost of one pass:

* a firing whose key is at most its feature's floor (the N-th key among examples already
  settled, which stay in the greedy set whatever comes later) can never be kept, and it only
  decides the fate of firings with smaller keys, which cannot be kept either: it is dropped
  at once;
* a document's firings are settled only once the document is read whole: a firing kept so
  far can be dropped by a larger one in a later window of its document, which in turn revives
  a firing it had dropped, and so on along a chain. So the rows of a document still open at
  the end of a batch are held back (:mod:`~llamascope_sdk.mining.open_docs`, with only the
  firings above the floor) and settled with the batch that completes the document.

:func:`spaced` computes the greedy choice for many (feature, document) groups at once, in
rounds: an undecided firing whose key beats every undecided neighbour closer than W is kept
(the sequential greedy keeps it too: every larger neighbour was already dropped), and its
undecided neighbours are dropped. Each round keeps at least the largest undecided key of
every group, so there are at most as many rounds as the longest chain of firings each closer
than W to the next with keys rising along it, and each round works only on the firings still
undecided.
"""

from __future__ import annotations

import torch

__all__ = ["scope_line", "spaced", "spacing_rule"]


def spacing_rule(top_window: int, sample_window: int) -> dict[str, object]:
    """The rule as stored in a store's metadata (``"example_spacing"``)."""
    return {"top": top_window, "samples": sample_window, "scope": "document",
            "rule": "two examples of a feature from one document are at least one window "
                    "apart in document positions (|pos_a - pos_b| >= window), also across "
                    "the document's sequences; chosen greedily by key (activation for top "
                    "examples, random priority for the decile sample), the best spaced set; "
                    "a window's content stops at its sequence's edges"}


def scope_line(meta: dict[str, object]) -> str:
    """One line saying how a store's examples are spaced (its ``example_spacing``), or that
    the store predates the rule."""
    rule = meta.get("example_spacing")
    if not isinstance(rule, dict):
        return "examples not spaced (store mined before the spacing rule)"
    scope = rule.get("scope", "sequence")
    return (f"examples of a feature at least a window apart within a {scope} (top: "
            f"{rule.get('top')} tokens, samples: {rule.get('samples')})")


def _range_max(vals_N: torch.Tensor, lo_N: torch.Tensor, hi_N: torch.Tensor,
               span: int) -> torch.Tensor:
    """max(vals[lo:hi]) per entry (-1 for an empty range); every range is at most ``span``
    long. A sparse table: level j holds the max of 2**j consecutive values."""
    n = vals_N.numel()
    levels = [vals_N]
    while (1 << len(levels)) <= span:
        prev, step = levels[-1], 1 << (len(levels) - 1)
        nxt = prev.clone()
        if step < n:
            nxt[:n - step] = torch.maximum(prev[:n - step], prev[step:])
        levels.append(nxt)
    length = (hi_N - lo_N).clamp(min=0)
    out = torch.full_like(vals_N, -1)
    some = length > 0
    if not bool(some.any()):
        return out
    lev = torch.floor(torch.log2(length[some].double())).long()
    table = torch.stack(levels)  # [L, N]
    a = table[lev, lo_N[some]]
    b = table[lev, hi_N[some] - (1 << lev)]
    out[some] = torch.maximum(a, b)
    return out


def spaced(group_N: torch.Tensor, pos_N: torch.Tensor, key_N: torch.Tensor,
           gap: int) -> torch.Tensor:
    """Which entries the greedy spacing rule keeps: bool [N].

    ``group_N`` (int64 >= 0) says which entries compete (one feature in one document),
    ``pos_N`` their positions (distinct within a group), ``key_N`` their keys (distinct within
    a group, >= 0). Within each group, an entry is dropped when a kept entry with a larger key
    lies closer than ``gap`` positions; entries are kept greedily by key (see the module
    docstring). ``gap <= 1`` keeps everything.
    """
    n = key_N.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=key_N.device)
    if n == 0 or gap <= 1:
        return keep.fill_(True) if n else keep
    stride = int(pos_N.max()) + gap + 1
    coord = group_N.long() * stride + pos_N.long()
    coord, order = coord.sort()
    key = key_N[order]
    live = torch.arange(n, device=key.device)  # undecided entries, as indices into the sorted arrays
    while live.numel():
        c, k = coord[live], key[live]
        lo = torch.searchsorted(c, c - (gap - 1))
        hi = torch.searchsorted(c, c + gap)  # exclusive: c + gap - 1 is the last neighbour
        idx = torch.arange(live.numel(), device=c.device)
        span = 2 * gap - 1
        left = _range_max(k, lo, idx, span)
        right = _range_max(k, idx + 1, hi, span)
        won = (k > left) & (k > right)
        keep[order[live[won]]] = True
        # Undecided neighbours of a winner are dropped: count winners in each range.
        wins = torch.cat([torch.zeros(1, dtype=torch.long, device=c.device), won.long().cumsum(0)])
        near = (wins[hi] - wins[lo]) > won.long()
        live = live[~won & ~near]
    return keep
