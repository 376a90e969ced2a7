"""Rows of the edge matrix: one backward pass through the frozen model per batch of targets.

A target t (a feature at layer L and position p, or a logit) reads its input linearly from
the frozen model: ``w_t . x_L[p]`` (encoder row at the transcoder input) or
``(u_t - mean u) . n_final[T-1]`` (read vector at the final norm's output). Injecting ``w_t``
as the gradient of row b of the batch and back-propagating through the frozen forward gives,
at every source tensor, the gradient ``g_b`` of that target's input. The direct effect of a
source s on t is then::

    feature (l, q, i):  A[t, s] = a_s * (W_dec[i] . g_b(y_l[q]))      (y_l: MLP output leaf)
    error   (l, q):     A[t, s] = e_l[q] . g_b(y_l[q])
    token   (q):        A[t, s] = emb[q] . g_b(h_0[q])                  (embedding leaf)

Columns follow the node order (features of all layers, errors layer by layer, tokens). The
feature contraction multiplies each position's gradients by the decoder rows active there
(one batched matrix product per run of positions), so its scratch memory is a few buffers of
at most ``CHUNK_ELEMENTS`` values, never ``B * A * D``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamascope_sdk.trace.frozen import Tape
from llamascope_sdk.trace.replacement import Replacement

#: Scratch budget of the feature contraction, in elements (128 MiB of float32).
CHUNK_ELEMENTS = 1 << 25


@dataclass
class Targets:
    """A batch of targets: layer (``n_layers`` = logit), position and read vector each."""

    layers: list[int]
    positions: list[int]
    vectors_BD: torch.Tensor  # work dtype


def _grad_outputs(tape: Tape, rep: Replacement, targets: Targets
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(outputs, batched grad_outputs) for autograd: per target layer, its input tensor
    narrowed to the positions the batch reads there (``[1, P, D]``) and the read vectors
    placed at their rows (``[B, 1, P, D]``), so injections take ``B P D``, not ``B T D``."""
    outputs, grads = [], []
    n = len(targets.layers)
    for layer in sorted(set(targets.layers)):
        full = tape.final if layer == rep.n_layers else tape.tc_in[layer]
        assert full is not None
        rows_b = [b for b, lt in enumerate(targets.layers) if lt == layer]
        positions = sorted({targets.positions[b] for b in rows_b})
        where = {p: i for i, p in enumerate(positions)}
        out = full[:, positions]
        g = torch.zeros((n, *out.shape), dtype=out.dtype, device=out.device)
        for b in rows_b:
            vec = targets.vectors_BD[b].to(device=g.device, dtype=g.dtype)
            g[b, 0, where[targets.positions[b]]] = vec
        outputs.append(out)
        grads.append(g)
    return outputs, grads


def backward(tape: Tape, rep: Replacement, targets: Targets
             ) -> tuple[dict[int, torch.Tensor | None], torch.Tensor | None]:
    """Gradients of the targets' inputs at every MLP-output leaf below the highest target
    layer and at the embedding leaf: ({layer: [B, T, D]}, [B, T, D] or None).

    The frozen forward ran once, on one copy of the prompt; autograd's batched gradients
    (``is_grads_batched``: the backward vectorised over the B injected gradients) give the B
    rows in one pass, the same numbers as B separate backward passes."""
    top = max(targets.layers)
    layers = [layer for layer in range(min(top, rep.n_layers)) if layer in tape.mlp_out]
    assert tape.embed is not None
    inputs = [tape.mlp_out[layer] for layer in layers] + [tape.embed]
    outputs, grad_outputs = _grad_outputs(tape, rep, targets)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True,
                                allow_unused=True, is_grads_batched=True)
    flat = [None if g is None else g[:, 0] for g in grads]
    return dict(zip(layers, flat[:-1], strict=True)), flat[-1]


def _feature_columns(rep: Replacement, layer: int, g_BTD: torch.Tensor, out_BA: torch.Tensor,
                     col: int) -> None:
    """Write a_s * W_dec[i] . g(y_l[q]) for the layer's active features into ``out_BA``.

    The features are grouped by position (they are sorted by position): for a run of P
    positions, their decoder rows are laid out ``[P, width, D]`` (width = the most features
    active at one position, unused slots zero) and one batched matrix product with the
    gradients ``[P, B, D]`` gives every dot product; scratch stays within
    ``CHUNK_ELEMENTS`` per buffer."""
    lf = rep.features[layer]
    n = int(lf.pos.numel())
    if n == 0:
        return
    b, t, d = g_BTD.shape
    dev, dt = g_BTD.device, rep.dtype
    pos = lf.pos.to(dev)
    counts_T = torch.bincount(pos, minlength=t)
    ends_T = torch.cumsum(counts_T, 0)
    slot = torch.arange(n, device=dev) - (ends_T - counts_T)[pos]
    width = int(counts_T.max())
    per_position = width * (d + b) + b * d
    step = max(1, CHUNK_ELEMENTS // per_position)
    w_dec = rep.transcoders[layer].W_dec
    bounds = [0, *ends_T.tolist()]
    for p0 in range(int(pos[0]), int(pos[-1]) + 1, step):
        p1 = min(t, p0 + step)
        s, e = bounds[p0], bounds[p1]
        if s == e:
            continue
        flat = (pos[s:e] - p0) * width + slot[s:e]
        w_PwD = torch.zeros((p1 - p0) * width, d, dtype=dt, device=dev)
        w_PwD[flat] = w_dec[lf.feat[s:e]].to(device=dev, dtype=dt)
        g_PBD = g_BTD[:, p0:p1].transpose(0, 1).to(dt)
        r_PBw = torch.bmm(g_PBD, w_PwD.view(p1 - p0, width, d).transpose(1, 2))
        vals_Bn = r_PBw.permute(1, 0, 2).reshape(b, -1)[:, flat] * lf.act[s:e].to(dev)
        out_BA[:, col + s:col + e] = vals_Bn.to(out_BA.device)


def contract(rep: Replacement, grads: dict[int, torch.Tensor | None], g_embed: torch.Tensor | None,
             out_BC: torch.Tensor, offsets: dict[int, int]) -> None:
    """Fill ``out_BC`` (zeros, [B, columns]) with the direct effects of every source.

    ``offsets[layer]`` is the first column of that layer's features."""
    n_feat = sum(int(lf.pos.numel()) for lf in rep.features.values())
    t = rep.n_pos
    for layer, g_BTD in grads.items():
        if g_BTD is None:
            continue
        if layer in rep.features:
            _feature_columns(rep, layer, g_BTD, out_BC, offsets[layer])
        err_TD = rep.errors[layer].to(g_BTD.device)
        err_BT = torch.einsum("btd,td->bt", g_BTD.to(rep.dtype), err_TD)
        start = n_feat + layer * t
        out_BC[:, start:start + t] = err_BT.to(out_BC.device)
    if g_embed is not None:
        tok_BT = torch.einsum("btd,td->bt", g_embed.to(rep.dtype),
                              rep.tokens_TD.to(g_embed.device))
        start = n_feat + rep.n_layers * t
        out_BC[:, start:start + t] = tok_BT.to(out_BC.device)


def feature_offsets(rep: Replacement) -> dict[int, int]:
    """First column of each layer's features in node order."""
    offsets, col = {}, 0
    for layer, lf in sorted(rep.features.items()):
        offsets[layer] = col
        col += int(lf.pos.numel())
    return offsets
