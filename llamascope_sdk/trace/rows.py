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
feature contraction gathers decoder rows chunk by chunk, so its scratch memory is
``B * chunk * D`` floats, never ``B * A * D``.
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
    """(outputs, grad_outputs) for autograd: the read vectors placed at their rows."""
    outputs, grads = [], []
    for layer in sorted(set(targets.layers)):
        out = tape.final if layer == rep.n_layers else tape.tc_in[layer]
        assert out is not None
        g = torch.zeros_like(out)
        for b, (lt, pos) in enumerate(zip(targets.layers, targets.positions, strict=True)):
            if lt == layer:
                g[b, pos] = targets.vectors_BD[b].to(device=g.device, dtype=g.dtype)
        outputs.append(out)
        grads.append(g)
    return outputs, grads


def backward(tape: Tape, rep: Replacement, targets: Targets
             ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Gradients of the targets' inputs at every MLP-output leaf below the highest target
    layer and at the embedding leaf: ({layer: [B, T, D]}, [B, T, D] or None)."""
    top = max(targets.layers)
    layers = [layer for layer in range(min(top, rep.n_layers)) if layer in tape.mlp_out]
    assert tape.embed is not None
    inputs = [tape.mlp_out[layer] for layer in layers] + [tape.embed]
    outputs, grad_outputs = _grad_outputs(tape, rep, targets)
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True,
                                allow_unused=True)
    return dict(zip(layers, grads[:-1], strict=True)), grads[-1]


def _feature_columns(rep: Replacement, layer: int, g_BTD: torch.Tensor, out_BA: torch.Tensor,
                     col: int) -> None:
    """Write a_s * W_dec[i] . g(y_l[q]) for the layer's active features into ``out_BA``."""
    lf = rep.features[layer]
    sae = rep.transcoders[layer]
    n, b, d = int(lf.pos.numel()), g_BTD.shape[0], g_BTD.shape[-1]
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * d))
    dev = g_BTD.device
    for s in range(0, n, chunk):
        pos = lf.pos[s:s + chunk].to(dev)
        w_cD = sae.W_dec[lf.feat[s:s + chunk]].to(device=dev, dtype=rep.dtype)
        a_c = lf.act[s:s + chunk].to(dev)
        g_BcD = g_BTD[:, pos].to(rep.dtype)
        vals = torch.einsum("bcd,cd->bc", g_BcD, w_cD) * a_c
        out_BA[:, col + s:col + s + vals.shape[1]] = vals.to(out_BA.device)


def contract(rep: Replacement, grads: dict[int, torch.Tensor], g_embed: torch.Tensor | None,
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
