"""The strongest paths into the top logit, as text.

A path runs from a token (or an error node, or a feature with no kept input) through features
to the logit along kept edges. Its strength is the product of the normalised edge magnitudes
``N[t, s] = |A[t, s]| / sum_s' |A[t, s']|`` along it: the share of the logit's input
magnitude it carries, which is the quantity influence sums over all paths. The k strongest
are found exactly by keeping the k best partial paths at each node, visiting targets from the
logit down (a feature's inputs come from strictly lower layers, tokens and errors have none).
"""

from __future__ import annotations

import heapq

import torch

from llamascope_sdk.trace.graph import Graph
from llamascope_sdk.trace.influence import PruneResult, row_sums

Path = tuple[float, list[tuple[int, float]]]  # (strength, [(node, weight into the next)])


def _inputs(graph: Graph, mask_RC: torch.Tensor, sums_R: torch.Tensor, row: int
            ) -> list[tuple[int, float, float]]:
    """(source node, normalised magnitude, weight) of the kept inputs of one row."""
    cols = mask_RC[row].nonzero().flatten().tolist()
    total = float(sums_R[row])
    weights = graph.edges_RC[row, cols].tolist()
    return [(c, abs(w) / total, w) for c, w in zip(cols, weights, strict=True)]


def strongest_paths(graph: Graph, pruned: PruneResult, *, k: int = 5, logit: int = 0
                    ) -> list[Path]:
    """The ``k`` strongest paths into logit ``logit`` (0: the top one), strongest first."""
    mask_RC = pruned.edge_mask_RC
    sums_R = row_sums(graph.edges_RC, 1e-10)
    row_of = {int(n): r for r, n in enumerate(graph.row_nodes().tolist())}
    best: dict[int, list[Path]] = {graph.logit_offset + logit: [(1.0, [])]}
    done: list[Path] = []
    feats = sorted(range(graph.n_features), key=lambda f: -int(graph.features_F3[f, 0]))
    for node in [graph.logit_offset + logit, *feats]:
        partial = best.pop(node, [])
        if not partial:
            continue
        ins = _inputs(graph, mask_RC, sums_R, row_of[node]) if node in row_of else []
        if not ins:
            done.extend(partial)
            continue
        for strength, path in partial:
            for src, share, weight in ins:
                cand = (strength * share, [(src, weight), *path])
                target = done if src >= graph.n_features else best.setdefault(src, [])
                target.append(cand)
        for src in {s for s, _, _ in ins if s < graph.n_features}:
            best[src] = heapq.nlargest(k, best[src], key=lambda p: p[0])
    return heapq.nlargest(k, done, key=lambda p: p[0])


def paths_text(graph: Graph, pruned: PruneResult, *, k: int = 5) -> str:
    """The strongest paths into the top logit, one line each, for the terminal."""
    top = graph.describe_node(graph.logit_offset)
    lines = [f"Strongest paths into {top}; strength = share of the logit's input magnitude "
             "carried along the path (product of |edge| / sum of |edges| into each node), "
             "[edge = direct effect]:"]
    for i, (strength, path) in enumerate(strongest_paths(graph, pruned, k=k), 1):
        parts = [f"{graph.describe_node(n)} [{w:+.3g}]" for n, w in path]
        end = f"logit {graph.logit_strings[0]!r}"
        lines.append(f"{i:2d}. {strength:.4f}  " + " -> ".join([*parts, end]))
    if len(lines) == 1:
        lines.append("  (no kept path: lower --node-threshold/--edge-threshold keep fewer nodes; "
                     "raise them to keep more)")
    return "\n".join(lines) + "\n"
