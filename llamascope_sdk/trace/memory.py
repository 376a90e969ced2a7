"""How much memory an attribution takes, before it runs (the formula docs/trace.md states).

With L layers, T tokens, D the hidden size, e the model's bytes per value, w the work dtype's
(4, or 8 for a float64 model), B the batch, A the active features, W the most features
active at one position of one layer, F the feature rows, K the logit targets, and H d_h /
H_kv d_h the query / key-value widths of attention::

    weights      model + transcoders (loaded before the call)
    replacement  L T D (e + w) + A (16 + w)     MLP outputs and errors per layer, the active
                                                 features (position, index, activation)
    forward      T L (3 D + 2 H d_h + 2 H_kv d_h) e
                                                 the frozen forward, run once: what autograd
                                                 saves (the value-path inputs, q, k, v and the
                                                 attention output) and the transcoder inputs;
                                                 eager attention saves the H T^2 pattern per
                                                 layer instead of q, k, v and the output
    backward     B T (L + 2) D e                 one batched backward: a gradient per source
                                                 layer and the embeddings, the running one
    scratch      w P (2 W D + B D + 3 B W)       the decoder contraction's buffers for a run of
                                                 P = min(T, CHUNK / (W (D + B) + B D))
                                                 positions
    edges        w (F + K) (A + (L + 1) T)       the edge matrix while rows are computed
    graph        w (F + K) (F + (L + 1) T)       the graph's matrix, built after the backward
                                                 passes are over (only when F < A)

    peak = weights + max(replacement + forward + backward + scratch + edges,
                         replacement + edges + graph)

No term is quadratic in the number of nodes and none sorts the edges; nothing grows with B
but the backward and the scratch. The terms count tensors alive at once; the process's
resident memory matches them only if freed tensors go back to the system, which glibc's
malloc does not do for its heap: on Linux/glibc :func:`return_freed_memory` (called by
``attribute``) sets malloc's mmap threshold to 1 MiB for the process, so every large tensor
is its own mapping, returned when freed (measured on 1,024 tokens: 2.5 GiB added without it,
1.4 GiB with it). The formula assumes model and transcoders on one device; spread over
several, each holds its layers' share.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.sites import decoder_layers, hidden_size
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.trace.rows import CHUNK_ELEMENTS

GIB = float(1 << 30)
#: glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory of one attribution, in bytes, by term."""

    weights: int
    replacement: int
    forward: int
    backward: int
    scratch: int
    edges: int
    graph: int

    @property
    def device(self) -> int:
        """On the model's device(s): weights and everything the backward passes hold."""
        return self.weights + self.replacement + self.forward + self.backward + self.scratch

    @property
    def host(self) -> int:
        """Where the edge matrix is kept (``graph_device``)."""
        return self.edges + self.graph

    @property
    def added(self) -> int:
        """The peak beyond the weights, model and edge matrix on one device."""
        return max(self.replacement + self.forward + self.backward + self.scratch + self.edges,
                   self.replacement + self.edges + self.graph)

    def describe(self) -> str:
        return (f"estimated peak memory: {(self.weights + self.added) / GIB:.2f} GiB "
                f"(weights {self.weights / GIB:.2f}, prompt's replacement "
                f"{self.replacement / GIB:.2f}, frozen forward {self.forward / GIB:.2f}, "
                f"backward {self.backward / GIB:.2f}, contraction {self.scratch / GIB:.2f}, "
                f"edge matrix {self.edges / GIB:.2f} + graph {self.graph / GIB:.2f})")


def _attn_widths(model: nn.Module) -> tuple[int, int]:
    """(H d_h, H_kv d_h): query and key/value widths."""
    cfg = getattr(model, "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden_size(model) // heads)
    return heads * head_dim, kv_heads * head_dim


def widest_position(active_A3: torch.Tensor) -> int:
    """W of the formula: the most features active at one (layer, position)."""
    if active_A3.shape[0] == 0:
        return 0
    keys = active_A3[:, 0] * (int(active_A3[:, 1].max()) + 1) + active_A3[:, 1]
    return int(torch.unique(keys, return_counts=True)[1].max())


def _scratch(w: int, t: int, d: int, b: int, width: int) -> int:
    if width == 0:
        return 0
    per_position = width * (d + b) + b * d
    p = min(t, max(1, CHUNK_ELEMENTS // per_position))
    return w * p * (2 * width * d + b * d + 3 * b * width)


def estimate(model: nn.Module, transcoders: Mapping[int, SAE], *, n_pos: int, n_active: int,
             n_feature_rows: int, n_logits: int, batch_size: int, widest: int) -> Estimate:
    """The memory formula of the module docstring for this model, these transcoders and
    this prompt's counts (``widest``: :func:`widest_position` of the active features)."""
    n_layers, d = len(decoder_layers(model)), hidden_size(model)
    p0 = next(model.parameters())
    e, w = p0.element_size(), (8 if p0.dtype == torch.float64 else 4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(sum(t.numel() * t.element_size() for t in sae.state_dict().values())
                   for sae in transcoders.values())
    b, t = batch_size, n_pos
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    if impl == "eager":
        heads = int(getattr(model.config, "num_attention_heads", 1))
        attn = heads * t * t
    else:
        q_width, kv_width = _attn_widths(model)
        attn = 2 * t * (q_width + kv_width)
    forward = n_layers * (3 * t * d + attn) * e
    replacement = n_layers * t * d * (e + w) + n_active * (16 + w)
    backward = b * t * (n_layers + 2) * d * e
    rows_, cols = n_feature_rows + n_logits, n_active + (n_layers + 1) * n_pos
    graph = host_bytes(rows_, n_active + n_logits, cols, w) - w * rows_ * cols
    return Estimate(weights=int(weights), replacement=int(replacement), forward=int(forward),
                    backward=int(backward), scratch=_scratch(w, t, d, b, widest),
                    edges=w * rows_ * cols, graph=int(graph))


def return_freed_memory() -> bool:
    """On Linux with glibc, set malloc's mmap threshold to 1 MiB for this process (unless
    ``MALLOC_MMAP_THRESHOLD_`` is set in the environment): every allocation of 1 MiB or more
    is then its own mapping, returned to the system when freed, so freed tensors do not stay
    in the heap and the resident memory follows the formula. This also turns off glibc's
    dynamic threshold for the rest of the process. Returns whether it was set."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20))


def measured_peak(device: torch.device) -> int | None:
    """Peak allocated bytes on a CUDA device since the last reset; None elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: MemAvailable of /proc/meminfo for the CPU,
    the CUDA driver's free bytes for a GPU; None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        text = Path("/proc/meminfo").read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _size(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB // 10 else f"{n / (1 << 20):.1f} MiB"


def host_bytes(n_rows: int, n_active: int, n_cols: int, w: int = 4) -> int:
    """The host term of the formula for ``n_rows`` feature rows (plus the logit rows)."""
    graph = 0 if n_rows >= n_active else w * n_rows * (n_cols - n_active + n_rows)
    return w * n_rows * n_cols + graph


def check_edge_matrix_fits(est: Estimate, device: torch.device, *, n_active: int,
                           n_logits: int, n_cols: int) -> None:
    """Refuse, before any backward pass, an edge matrix larger than the memory available where
    it is kept, naming a ``max_feature_nodes`` that fits (in 90% of it).

    Raises:
        InputError: the message gives both sizes and the largest feature-row count that fits.
    """
    free = available_bytes(device)
    if free is None or est.host <= free:
        return
    lo, hi = 0, n_active  # largest F with host_bytes(F + K) <= 0.9 free
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = host_bytes(mid + n_logits, n_active + n_logits, n_cols) <= 0.9 * free
        lo, hi = (mid, hi) if ok else (lo, mid - 1)
    raise InputError(
        f"the edge matrix needs {_size(est.host)} on {device}, {_size(free)} is available: "
        f"use max_feature_nodes (--max-nodes) {lo} or fewer, or a shorter prompt")
