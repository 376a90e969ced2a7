"""Faster few-row decoding on CPU: a column-major copy of each linear layer's weight.

Decoding a few sequences multiplies a few row vectors by every weight matrix of the model, so
the step costs what reading the weights costs. ``nn.Linear`` keeps its weight ``[out, in]``
row-major and computes ``x @ W.T``; for one to three rows, the CPU BLAS that PyTorch ships
(MKL) reads that layout well below the memory bandwidth it reaches on a contiguous ``W.T``.
Measured on the 2-core AMD EPYC machine this SDK is developed on, one thread, SmolLM2-135M's
shapes with the weights streamed from memory: the tied 49,152 x 576 output matrix, one row,
11.1 ms row-major against 6.3 ms from the copy; the 30 layers' seven matrices 36.9 / 48.1 /
57.2 ms for 1 / 2 / 3 rows row-major against 30.6 / 39.1 / 47.3 ms from copies; from 4 rows on
the row-major layout is as fast or faster (4 rows 45.2 against 48.4 ms, 8 rows 53.8 against
57.1 ms). So the copies serve inputs of at most :data:`MAX_ROWS` rows.

For 4 to 16 rows, a large matrix (the output matrix) is multiplied in slices of
:data:`CHUNK` output features, each slice of the row-major weight on its own: 49,152 x 576,
chunk 1,024: 4 rows 16.1 ms against 22.0 ms in one product, 8 rows 16.1 against 20.1, 16 rows
25.8 against 30.7 (chunks of 4,096). Each output is the same dot product in the same order, so
the result is bit for bit that of the single product (tested); the copies are not used there.

:func:`add_row_copies` gives every plain ``nn.Linear`` of a CPU model such a copy (a
non-persistent buffer ``row_copy``, so it follows ``.to()`` and is never saved) and makes it
use the copy for inputs of at most :data:`MAX_ROWS` rows; :func:`remove_row_copies` undoes it.
Values differ from the row-major product only by float rounding (another summation order); a
forward of the model uses the copies for few-row inputs whoever calls it, so the model stays
consistent with itself. If a weight is changed in place after the copy was made, the layer
notices (the tensor's version counter) and uses the weight itself. The cost is memory: one
more copy of every linear weight (:func:`row_copy_bytes`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Inputs of at most this many rows use the copy (the module docstring's measurements).
MAX_ROWS = 3
#: Inputs of more rows, up to CHUNK_MAX_ROWS, multiply a weight of at least 2 x CHUNK output
#: features CHUNK outputs at a time (bit for bit the same result).
CHUNK, CHUNK_MAX_ROWS = 1024, 16


class _RowCopyLinear(nn.Linear):
    """``nn.Linear`` whose inputs of at most MAX_ROWS rows are multiplied by a contiguous copy
    of ``W.T``, and whose large weight is sliced for up to CHUNK_MAX_ROWS rows."""

    row_copy: torch.Tensor
    _row_copy_version: int | None  # None: an inference tensor (no version counter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows <= MAX_ROWS and (self._row_copy_version is None
                                 or self.weight._version == self._row_copy_version):
            out = x @ self.row_copy
            return out if self.bias is None else out + self.bias
        if rows <= CHUNK_MAX_ROWS and self.out_features >= 2 * CHUNK:
            w, b = self.weight, self.bias
            return torch.cat([F.linear(x, w[i:i + CHUNK], None if b is None else b[i:i + CHUNK])
                              for i in range(0, self.out_features, CHUNK)], dim=-1)
        return F.linear(x, self.weight, self.bias)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


def row_copy_bytes(model: nn.Module) -> int:
    """Bytes :func:`add_row_copies` would add (each distinct weight once)."""
    seen: dict[int, int] = {}
    for m in _linears(model):
        seen[id(m.weight)] = m.weight.numel() * m.weight.element_size()
    return sum(seen.values())


def add_row_copies(model: nn.Module) -> int:
    """Give every plain ``nn.Linear`` of ``model`` a column-major copy for few-row inputs.

    Only for models on the CPU (on a GPU the row-major product is already at bandwidth).
    Returns the bytes added; a tied weight (the output matrix of a model that ties it to the
    embedding) is copied once. Undo with :func:`remove_row_copies`.

    Raises:
        ValueError: the model is not on the CPU.
    """
    linears = _linears(model)
    devices = {m.weight.device.type for m in linears}
    if devices - {"cpu"}:
        raise ValueError(f"row copies are for models on the CPU; this one is on "
                         f"{', '.join(sorted(devices))}")
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for m in linears:
            w = m.weight
            if id(w) not in copies:
                copies[id(w)] = w.detach().t().contiguous()
            m.register_buffer("row_copy", copies[id(w)], persistent=False)
            object.__setattr__(m, "_row_copy_version", None if w.is_inference() else w._version)
            m.__class__ = _RowCopyLinear
    return sum(c.numel() * c.element_size() for c in copies.values())


def remove_row_copies(model: nn.Module) -> None:
    """Undo :func:`add_row_copies` (nothing happens to a model without copies)."""
    for m in model.modules():
        if isinstance(m, _RowCopyLinear):
            del m.row_copy
            del m._row_copy_version
            m.__class__ = nn.Linear  # type: ignore[assignment]


def has_row_copies(model: nn.Module) -> bool:
    """Whether :func:`add_row_copies` was applied to ``model``."""
    return any(type(m) is _RowCopyLinear for m in model.modules())
