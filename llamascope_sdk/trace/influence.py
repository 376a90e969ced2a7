"""Influence on the logits, and pruning by it (circuit-tracer's definitions, chunked).

With A the graph's edge matrix (target x source), its row-normalised magnitude
``N = |A| / rowsum(|A|)`` and ``w`` the logit probabilities placed on the logit nodes::

    influence = w N + w N^2 + w N^3 + ...        (total indirect influence on the logits)

computed by power iteration. Node pruning keeps the nodes of highest influence that together
hold ``node_threshold`` of the total (tokens and logits always); edge pruning scores each edge
``N[t, s] * (influence[t] + w[t])`` on the node-pruned graph and keeps the highest that hold
``edge_threshold`` of the total score; then feature and error nodes left without outgoing
edges, and features without incoming ones, are dropped until nothing changes.

Everything works on the rectangular edge matrix (rows = features and logits, columns =
features, errors, tokens), row chunk by row chunk, so scratch memory is one chunk; the
cumulative-fraction threshold over all edges is found by bisection on the float bit
pattern (exact, 32 passes over the matrix) instead of sorting every edge.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from llamascope_sdk.trace.graph import Graph

#: Rows per chunk are chosen so that a chunk holds about this many elements.
CHUNK_ELEMENTS = 1 << 24


def _row_chunks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(1, n_cols))
    for s in range(0, n_rows, step):
        yield slice(s, min(n_rows, s + step))


def row_sums(edges_RC: torch.Tensor, clamp: float) -> torch.Tensor:
    """sum_s |A[t, s]| per row, clamped below (circuit-tracer: 1e-10 for graphs, 1e-8 while
    attributing)."""
    out = torch.empty(edges_RC.shape[0], dtype=torch.float32, device=edges_RC.device)
    for sl in _row_chunks(*edges_RC.shape):
        out[sl] = edges_RC[sl].abs().float().sum(1)
    return out.clamp(min=clamp)


def _spread(edges_RC: torch.Tensor, weights_R: torch.Tensor) -> torch.Tensor:
    """weights @ |A| over row chunks (float32, length columns)."""
    out = torch.zeros(edges_RC.shape[1], dtype=torch.float32, device=edges_RC.device)
    for sl in _row_chunks(*edges_RC.shape):
        w = weights_R[sl]
        if bool(w.any()):
            out += w @ edges_RC[sl].abs().float()
    return out


def influence(edges_RC: torch.Tensor, row_node_R: torch.Tensor, logit_weights_R: torch.Tensor,
              *, clamp: float = 1e-10, max_iter: int = 1000) -> torch.Tensor:
    """Total influence of every column node on the logits (length = columns).

    ``row_node_R[r]`` is the column index of row r's node, or -1 for a logit row (logits
    are never sources); ``logit_weights_R`` holds each logit row's probability, 0 elsewhere."""
    sums_R = row_sums(edges_RC, clamp)
    is_col = row_node_R >= 0
    cols = row_node_R.clamp(min=0)
    prod_R = logit_weights_R.float() / sums_R
    total = torch.zeros(edges_RC.shape[1], dtype=torch.float32, device=edges_RC.device)
    for _ in range(max_iter):
        step_C = _spread(edges_RC, prod_R)
        if not bool(step_C.any()):
            return total
        total += step_C
        prod_R = torch.where(is_col, step_C[cols], torch.zeros_like(step_C[cols])) / sums_R
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (a cycle?)")


def threshold_for_fraction(values: Callable[[], Iterator[torch.Tensor]], fraction: float) -> float:
    """The largest v such that the values >= v hold at least ``fraction`` of the total
    (all values non-negative): circuit-tracer's sort-and-cumsum threshold, found by bisection
    on the float32 bit pattern (order-preserving for non-negative floats), one pass per bit."""
    total = sum(float(c.double().sum()) for c in values())
    if total <= 0:
        return 0.0
    if fraction >= 1.0:  # circuit-tracer then takes the smallest value: everything is kept
        return min(float(c.min()) for c in values() if c.numel())
    goal = fraction * total
    lo, hi = 0, 0x7F800000  # bit patterns of 0.0 and +inf
    while hi - lo > 1:  # invariant: mass(>= bits lo) >= goal > mass(>= bits hi)
        mid = (lo + hi) // 2
        t = torch.tensor(mid, dtype=torch.int32).view(torch.float32).item()
        mass = sum(float(c.double()[c >= t].sum()) for c in values())
        lo, hi = (mid, hi) if mass >= goal else (lo, mid)
    # the threshold is the smallest value present that is >= bits lo
    t_lo = torch.tensor(lo, dtype=torch.int32).view(torch.float32).item()
    present = [c[c >= t_lo].min() for c in values() if bool((c >= t_lo).any())]
    return float(min(present)) if present else t_lo


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # [n_nodes] bool, in node order
    edge_mask_RC: torch.Tensor  # [rows, columns] bool
    node_influence: torch.Tensor  # [n_nodes] float32: influence (logits: their probability)
    cumulative: torch.Tensor  # [n_nodes] cumulative influence fraction of each node's rank


def _logit_rows(n_rows: int, n_logits: int, probs_K: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(n_rows, dtype=torch.float32)
    w[n_rows - n_logits:] = probs_K.float().cpu()
    return w


def node_influence(graph: Graph) -> torch.Tensor:
    """Influence of every node on the logits, in node order (logits get 0), as
    circuit-tracer's ``compute_node_influence``."""
    row_node = torch.cat([torch.arange(graph.n_features),
                          torch.full((graph.n_logits,), -1, dtype=torch.long)])
    w = _logit_rows(graph.edges_RC.shape[0], graph.n_logits, graph.logit_probs_K)
    infl_C = influence(graph.edges_RC, row_node, w)
    return torch.cat([infl_C, torch.zeros(graph.n_logits)])


def _edge_scores(pruned_RC: torch.Tensor, row_node: torch.Tensor,
                 w_R: torch.Tensor) -> Callable[[], Iterator[torch.Tensor]]:
    """Chunks of circuit-tracer's edge scores N[t, s] * (influence[t] + w[t]), row by row."""
    infl_C = influence(pruned_RC, row_node, w_R)
    sums_R = row_sums(pruned_RC, 1e-10)
    scale_R = torch.where(row_node >= 0, infl_C[row_node.clamp(min=0)], 0.0) + w_R

    def chunks() -> Iterator[torch.Tensor]:
        for sl in _row_chunks(*pruned_RC.shape):
            yield pruned_RC[sl].abs().float() * (scale_R[sl] / sums_R[sl])[:, None]
    return chunks


def _cleanup(node_mask: torch.Tensor, edge_mask_RC: torch.Tensor, graph: Graph) -> None:
    """Drop feature/error nodes without outgoing edges and features without incoming ones,
    repeatedly (circuit-tracer's loop), updating both masks in place."""
    nf, ncols = graph.n_features, graph.token_offset  # sources that may be dropped
    rows_nodes = graph.row_nodes()
    while True:
        old = node_mask.clone()
        node_mask[:ncols] &= edge_mask_RC[:, :ncols].any(0)
        node_mask[:nf] &= edge_mask_RC[:nf].any(1)
        edge_mask_RC[~node_mask[rows_nodes]] = False
        edge_mask_RC[:, ~node_mask[:graph.logit_offset]] = False
        if torch.equal(old, node_mask):
            return


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """circuit-tracer's ``prune_graph`` on the rectangular matrix, without a full sort.

    Raises:
        ValueError: a threshold outside (0, 1].
    """
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{name}={v} is outside (0, 1]")
    infl_N = node_influence(graph)
    t_node = threshold_for_fraction(lambda: iter([infl_N]), node_threshold)
    node_mask = infl_N >= t_node
    node_mask[graph.token_offset:] = True  # tokens and logits always
    rows = graph.row_nodes()
    pruned_RC = graph.edges_RC * node_mask[rows][:, None] * node_mask[:graph.logit_offset][None]
    row_node = torch.where(rows < graph.logit_offset, rows, -1)
    w_R = _logit_rows(pruned_RC.shape[0], graph.n_logits, graph.logit_probs_K)
    scores = _edge_scores(pruned_RC, row_node, w_R)
    t_edge = threshold_for_fraction(scores, edge_threshold)
    edge_mask_RC = torch.cat([c >= t_edge for c in scores()])
    _cleanup(node_mask, edge_mask_RC, graph)
    order = torch.argsort(infl_N, descending=True)
    cum = torch.cumsum(infl_N[order], 0) / infl_N.sum().clamp(min=1e-30)
    cumulative = torch.zeros_like(infl_N)
    cumulative[order] = cum
    return PruneResult(node_mask, edge_mask_RC, infl_N, cumulative)
