"""How much memory an attribution takes, before it runs (the formula docs/trace.md states).

With L layers, T tokens, D the hidden size, e the model's bytes per value, B the batch, A the
active features, F the feature rows, K the logit targets, and H*d_h the attention width::

    device  = weights (model + transcoders)
            + B T L (2 D + 4 H d_h) e       frozen forward: transcoder inputs and MLP-output
                                              leaves kept for the batch, attention saves q, k,
                                              v and output for its backward (eager attention
                                              keeps the B H T^2 L pattern instead)
            + B T (L + 2) D e                one backward: a gradient per source layer,
                                              the injected gradients
            + 4 * CHUNK                      scratch of the decoder contraction (128 MiB)
    host    = 4 (F + K) (A + (L + 1) T)      the edge matrix while rows are computed
            + 4 (F + K) (F + (L + 1) T)      the graph's edge matrix (only when F < A)

No term is quadratic in the number of nodes and none sorts the edges. The device term assumes
model and transcoders on one device; spread over several, each holds its layers' share.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Estimate:
    """Predicted peak memory of one attribution, in bytes, by term."""

    weights: int
    forward: int
    backward: int
    scratch: int
    edges: int
    graph: int

    @property
    def device(self) -> int:
        return self.weights + self.forward + self.backward + self.scratch

    @property
    def host(self) -> int:
        return self.edges + self.graph

    def describe(self) -> str:
        return (f"estimated peak memory: {self.device / GIB:.2f} GiB on the model's device(s) "
                f"(weights {self.weights / GIB:.2f}, frozen forward {self.forward / GIB:.2f}, "
                f"backward {self.backward / GIB:.2f}), {self.host / GIB:.2f} GiB for the edge "
                "matrix")


def _attn_width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    head_dim = getattr(cfg, "head_dim", None) or hidden_size(model) // heads
    return heads * int(head_dim)


def estimate(model: nn.Module, transcoders: Mapping[int, SAE], *, n_pos: int, n_active: int,
             n_feature_rows: int, n_logits: int, batch_size: int) -> Estimate:
    """The memory formula of the module docstring for this model, these transcoders and
    this prompt's counts."""
    n_layers, d = len(decoder_layers(model)), hidden_size(model)
    e = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(sum(t.numel() * t.element_size() for t in sae.state_dict().values())
                   for sae in transcoders.values())
    b, t = batch_size, n_pos
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    if impl == "eager":
        heads = int(getattr(model.config, "num_attention_heads", 1))
        attn = b * heads * t * t * n_layers * e
    else:
        attn = 4 * b * t * n_layers * _attn_width(model) * e
    forward = 2 * b * t * n_layers * d * e + attn
    backward = b * t * (n_layers + 2) * d * e
    rows_, cols = n_feature_rows + n_logits, n_active + (n_layers + 1) * n_pos
    graph = host_bytes(rows_, n_active + n_logits, cols) - 4 * rows_ * cols
    return Estimate(weights=int(weights), forward=int(forward), backward=int(backward),
                    scratch=4 * CHUNK_ELEMENTS, edges=4 * rows_ * cols, graph=int(graph))


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


def host_bytes(n_rows: int, n_active: int, n_cols: int) -> int:
    """The host term of the formula for ``n_rows`` feature rows (plus the logit rows)."""
    graph = 0 if n_rows >= n_active else 4 * n_rows * (n_cols - n_active + n_rows)
    return 4 * n_rows * n_cols + graph


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
