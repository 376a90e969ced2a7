"""``attribute(model, transcoders, prompt) -> Graph``: the attribution graph of one prompt.

circuit-tracer's definition for per-layer transcoders (docs/trace.md has the formulas), on a
plain transformers model:

1. one no-grad forward records each layer's transcoder input and MLP output; the active
   features, error nodes and logit targets follow (:mod:`.replacement`);
2. one forward of the frozen replacement model on the prompt (:mod:`.frozen`);
3. one batched backward pass per batch of B targets (B = min(batch_size, number of target
   rows); autograd's ``is_grads_batched``) gives B rows of the edge matrix (:mod:`.rows`):
   first the logits, then features in order of their current influence on the logits
   (recomputed every ``update_interval`` batches), until ``max_feature_nodes`` have rows;
4. the graph keeps the features that got rows, in node order.

Peak memory follows :func:`llamascope_sdk.trace.memory.estimate` (the formula in
docs/trace.md), printed before step 2; on glibc,
:func:`~llamascope_sdk.trace.memory.return_freed_memory` runs first so that tensors freed
between batches leave the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

import llamascope_sdk.trace.replacement as replacement
import llamascope_sdk.trace.rows as rows
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.loading.models import tokenize
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.trace.frozen import Tape, frozen_forward
from llamascope_sdk.trace.graph import Graph
from llamascope_sdk.trace.influence import influence
from llamascope_sdk.trace.memory import (
    check_edge_matrix_fits,
    estimate,
    return_freed_memory,
    widest_position,
)
from llamascope_sdk.trace.replacement import Replacement


def _token_ids(prompt: str | Sequence[int] | torch.Tensor, tokenizer: Any) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InputError("a text prompt needs a tokenizer: pass tokenizer=... or token ids")
        return tokenize(tokenizer, prompt)[0].cpu()
    ids = torch.as_tensor(prompt).reshape(-1).to(torch.long).cpu()
    if ids.numel() < 2:
        raise InputError("the prompt needs at least 2 tokens (BOS and one more)")
    return ids


def _strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


def _check_settings(max_logits: int, logit_probability: float, max_feature_nodes: int,
                    batch_size: int) -> None:
    if max_logits < 1:
        raise InputError(f"max_logits={max_logits}: at least 1 is needed")
    if not 0.0 < logit_probability <= 1.0:
        raise InputError(f"logit_probability={logit_probability} is outside (0, 1]")
    if max_feature_nodes < 0:
        raise InputError(f"max_feature_nodes={max_feature_nodes}: 0 or more is needed")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: at least 1 is needed")


class _RowFiller:
    """The edge matrix under construction and the frozen forward its rows come from."""

    def __init__(self, rep: Replacement, tape: Tape, n_rows: int, device: torch.device) -> None:
        self.rep, self.tape = rep, tape
        self.offsets = rows.feature_offsets(rep)
        self.n_active = sum(int(lf.pos.numel()) for lf in rep.features.values())
        self.n_cols = self.n_active + (rep.n_layers + 1) * rep.n_pos
        self.edges = torch.zeros(n_rows, self.n_cols, dtype=rep.dtype, device=device)
        self.layer_A = torch.cat([torch.full((int(lf.pos.numel()),), layer)
                                  for layer, lf in sorted(rep.features.items())]
                                 ) if rep.features else torch.zeros(0, dtype=torch.long)

    def fill(self, start: int, targets: rows.Targets) -> None:
        grads, g_embed = rows.backward(self.tape, self.rep, targets)
        n = len(targets.layers)
        with torch.no_grad():
            rows.contract(self.rep, grads, g_embed, self.edges[start:start + n], self.offsets)

    def feature_targets(self, idx: torch.Tensor) -> rows.Targets:
        """Targets for active features ``idx`` (node-order indices): their encoder rows."""
        layers, positions, vecs = [], [], []
        for a in idx.tolist():
            layer = int(self.layer_A[a])
            lf = self.rep.features[layer]
            k = a - self.offsets[layer]
            sae = self.rep.transcoders[layer]
            layers.append(layer)
            positions.append(int(lf.pos[k]))
            vecs.append(sae.W_enc[lf.feat[k]].detach().to(self.rep.dtype))
        dev = vecs[0].device if vecs else torch.device("cpu")
        return rows.Targets(layers, positions, torch.stack([v.to(dev) for v in vecs]))


def _select_features(filler: _RowFiller, n_logits: int, probs_K: torch.Tensor,
                     max_features: int, batch: int, update_interval: int,
                     report: Callable[[str], None]) -> torch.Tensor:
    """Rows for up to ``max_features`` features in circuit-tracer's order; returns, per row
    after the logits, the node-order index of its feature."""
    n_active = filler.n_active
    visited = torch.zeros(n_active, dtype=torch.bool)
    order: list[torch.Tensor] = []
    row_node = torch.full((filler.edges.shape[0],), -1, dtype=torch.long)
    w_R = torch.zeros(filler.edges.shape[0])
    w_R[:n_logits] = probs_K.float()
    st, done = n_logits, 0
    while done < max_features:
        if max_features == n_active:
            pending = torch.arange(n_active)
        else:
            infl = influence(filler.edges[:st], row_node[:st], w_R[:st], clamp=1e-8, max_iter=128)
            rank = torch.argsort(infl[:n_active], descending=True).cpu()
            pending = rank[~visited[rank]][:min(update_interval * batch, max_features - done)]
        # within a round the rows do not depend on their order: batching the round's
        # features by layer lets each backward stop at its batch's highest layer
        pending = pending[torch.sort(filler.layer_A[pending], stable=True).indices]
        for s in range(0, len(pending), batch):
            idx = pending[s:s + batch]
            filler.fill(st, filler.feature_targets(idx))
            row_node[st:st + len(idx)] = idx
            visited[idx] = True
            order.append(idx)
            st, done = st + len(idx), done + len(idx)
        report(f"  feature rows: {done}/{max_features}")
    return torch.cat(order) if order else torch.zeros(0, dtype=torch.long)


def _package(filler: _RowFiller, feature_rows: torch.Tensor, n_logits: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected features in node order, edges [F + K, F + (L+1) T]) from the filled matrix
    (logit rows first, then features in visiting order), one row chunk at a time."""
    selected = torch.sort(feature_rows).values
    n_sel = int(selected.numel())
    cols = torch.cat([selected, torch.arange(filler.n_active, filler.n_cols)])
    keep_all = n_sel == filler.n_active
    # row of each output row in the filled matrix: features in node order, then logits
    where = torch.empty(filler.n_active, dtype=torch.long)
    where[feature_rows] = torch.arange(n_logits, n_logits + n_sel)
    src_rows = torch.cat([where[selected], torch.arange(n_logits)])
    out = torch.empty(n_sel + n_logits, int(cols.numel()), dtype=filler.edges.dtype)
    step = max(1, (1 << 24) // max(1, filler.n_cols))
    for s in range(0, out.shape[0], step):
        block = filler.edges[src_rows[s:s + step]]
        out[s:s + step] = (block if keep_all else block[:, cols]).cpu()
    return selected, out


def attribute(model: nn.Module, transcoders: Sequence[SAE] | Mapping[int, SAE],
              prompt: str | Sequence[int] | torch.Tensor, *, tokenizer: Any = None,
              max_logits: int = 10, logit_probability: float = 0.95,
              max_feature_nodes: int = 7500, batch_size: int = 256, target: int | None = None,
              update_interval: int = 4, graph_device: str | torch.device = "cpu",
              verbose: bool = False, report: Callable[[str], None] | None = None) -> Graph:
    """The attribution graph of ``prompt`` through ``transcoders`` (circuit-tracer's
    definition for per-layer transcoders; docs/trace.md).

    Args:
        model: a transformers Llama-family causal LM (may be spread over devices).
        transcoders: SAE transcoders, one per layer at most (a list, or ``{layer: sae}``);
            a layer without one contributes its MLP output as one error node per position.
        prompt: text (needs ``tokenizer``; BOS is prepended) or token ids (BOS first).
        tokenizer: the model's tokenizer, for text prompts and readable token strings.
        max_logits: at most this many logit targets ...
        logit_probability: ... the most probable ones until their probability sums to this.
        max_feature_nodes: feature rows computed (the most influential features first).
        batch_size: targets per (batched) backward pass.
        target: attribute this one token id instead of the top logits.
        update_interval: batches between re-rankings of the features by influence.
        graph_device: where the edge matrix is kept (host memory by default).
        verbose: print progress and the memory estimate.
        report: where those lines go instead of print (e.g. stderr); implies verbose.

    Example:
        >>> g = attribute(model, [SAE.from_pretrained(f"L{i}TC-8x") for i in range(32)],
        ...               "The capital of France is", tokenizer=tok)
        >>> g.describe_node(g.logit_offset)
    """
    _check_settings(max_logits, logit_probability, max_feature_nodes, batch_size)
    if report is None:
        report = print if verbose else (lambda _m: None)
    t0 = time.perf_counter()
    return_freed_memory()
    tcs = replacement.by_layer(model, transcoders)
    ids_T = _token_ids(prompt, tokenizer)
    rep = replacement.build(model, tcs, ids_T)
    tok_K, probs_K, vecs_KD = replacement.logit_targets(
        model, rep.logits_V, max_logits=max_logits, logit_probability=logit_probability,
        target=target)
    n_logits, n_active = int(tok_K.numel()), rep.active_A3().shape[0]
    n_feat = min(max_feature_nodes, n_active)
    batch = max(1, min(batch_size, n_logits + n_feat))
    est = estimate(model, tcs, n_pos=rep.n_pos, n_active=n_active, n_feature_rows=n_feat,
                   n_logits=n_logits, batch_size=batch, widest=widest_position(rep.active_A3()))
    report(f"{n_active} active features, {n_logits} logit targets, {n_feat} feature rows; "
           + est.describe())
    check_edge_matrix_fits(est, torch.device(graph_device), n_active=n_active,
                           n_logits=n_logits, n_cols=n_active + (rep.n_layers + 1) * rep.n_pos)
    filler = _run_rows(model, rep, vecs_KD, n_feat, batch, update_interval, probs_K,
                       torch.device(graph_device), report)
    selected, edges = _package(filler[0], filler[1], n_logits)
    graph = Graph(
        prompt=prompt if isinstance(prompt, str) else "", input_tokens_T=ids_T,
        token_strings=_strings(tokenizer, ids_T.tolist()), n_layers=rep.n_layers,
        active_features_A3=rep.active_A3(), activations_A=rep.activations_A(),
        selected_A=selected, logit_tokens_K=tok_K, logit_probs_K=probs_K,
        logit_strings=_strings(tokenizer, tok_K.tolist()), edges_RC=edges,
        transcoder_layers=sorted(tcs), model_name=str(getattr(model, "name_or_path", "")),
        transcoder_names=[tcs[layer].name for layer in sorted(tcs)],
        info={"max_logits": max_logits, "logit_probability": logit_probability,
              "max_feature_nodes": max_feature_nodes, "batch_size": batch,
              "seconds": round(time.perf_counter() - t0, 3),
              "estimate_bytes": {**asdict(est), "device": est.device, "host": est.host,
                                 "added": est.added}})
    report(f"attribution done in {graph.info['seconds']:.1f} s")
    return graph.check()


def _run_rows(model: nn.Module, rep: Replacement, vecs_KD: torch.Tensor, n_feat: int,
              batch: int, update_interval: int, probs_K: torch.Tensor, device: torch.device,
              report: Callable[[str], None]) -> tuple[_RowFiller, torch.Tensor]:
    """The frozen forward (once), the logit rows, then the feature rows, ``batch`` at a time."""
    n_logits = int(vecs_KD.shape[0])
    ids_1T = rep.ids_T[None].to(replacement.embed_device(model))
    inner = getattr(model, "model", model)
    with frozen_forward(model, rep.mlp_out) as tape:
        inner(input_ids=ids_1T, use_cache=False)
        filler = _RowFiller(rep, tape, n_logits + n_feat, device)
        for s in range(0, n_logits, batch):
            k = min(batch, n_logits - s)
            filler.fill(s, rows.Targets([rep.n_layers] * k, [rep.n_pos - 1] * k,
                                        vecs_KD[s:s + k]))
        report(f"  logit rows: {n_logits}")
        feature_rows = _select_features(filler, n_logits, probs_K, n_feat, batch,
                                         update_interval, report)
        filler.tape = Tape()  # let the frozen forward's autograd graph go
    return filler, feature_rows
