"""Shared pieces of the format converters: reducing a foreign checkpoint's encoder/decoder to
a :class:`Plain` record, reading safetensors, resolving a Hub source, refusing clearly.

The readers never build an SAE themselves: they return a :class:`Plain` (hyperparams, raw
release tensors, folded threshold, file dtype) and :meth:`~llamascope_sdk.loading.sae.SAE.from_plain`
builds the SAE from it, so that this package does not import :mod:`llamascope_sdk.loading.sae`.

Every importer reduces its format to the same "plain" form, in model units with no runtime
normalisation::

    pre = x @ W_e.T + b_e                 # W_e [F, D]
    f   = act(pre)                        # jumprelu (per-feature t), topk or relu
    y^  = f @ W_d + b_d                   # W_d [F, D] rows of ANY norm n_i = ||W_d[i]||

and :func:`plain_record` maps it exactly onto this SDK's folded SAE (unit decoder rows)::

    W_enc[i] = n_i W_e[i],  b_enc[i] = n_i b_e[i],  W_dec[i] = W_d[i] / n_i,  b_dec = b_d
    value_i  = n_i f_i                    # the length of feature i's contribution
    jumprelu : relu(pre) 1[pre > t_i]  ==  a 1[a > max(t_i, 0) n_i]   (a = n_i pre, n_i > 0)
    topk     : ranked by pre (sparsity_include_decoder_norm=False: key relu(a)/n_i), or by
               n_i pre when the format ranks by decoder norm (sparsity_include_decoder_norm=True)

A threshold that differs per feature after this mapping is kept as a per-feature [F]
threshold (:meth:`~llamascope_sdk.loading.sae.SAE.set_threshold`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file

from llamascope_sdk.base.atomic import write_folder
from llamascope_sdk.base.errors import (
    CorruptCheckpointError,
    LlamascopeError,
    SaeNotFoundError,
)
from llamascope_sdk.core.fold import Folded
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.loading.formats.layouts import replaceable_sae_folder


class UnsupportedFormatError(LlamascopeError, ValueError):
    """A checkpoint whose format or feature cannot be expressed exactly by this SDK."""


@dataclass(frozen=True)
class Plain:
    """A foreign checkpoint in this SDK's terms, before an SAE is built from it with
    :meth:`~llamascope_sdk.loading.sae.SAE.from_plain`.

    Attributes:
        hyperparams: the release hyperparams (``converted_from`` names the source).
        tensors: the raw release tensors (``encoder.weight`` [F, D], ``encoder.bias`` [F],
            ``decoder.weight`` [D, F], ``decoder.bias`` [D]), as ``SAE.from_raw`` reads them.
        file_dtype: the dtype the source stored (what ``save_pretrained`` writes back).
        threshold: the JumpReLU threshold in the folded space, a scalar or one value per
            feature (``inf`` for a feature that never fires); None when there is none to set.
        threshold_times_decoder_norm: the threshold still has to be multiplied by the built
            SAE's decoder norms (``||d_i||``, as folding computes them).
        model_name: the base model the source names (kept as lm_config.json's model_name);
            None when it names none.
    """

    hyperparams: Hyperparams
    tensors: dict[str, torch.Tensor]
    file_dtype: torch.dtype
    threshold: torch.Tensor | None = None
    threshold_times_decoder_norm: bool = False
    model_name: str | None = None


class Exportable(Folded, Protocol):
    """What the exporters read of an SAE (see :class:`~llamascope_sdk.loading.sae.SAE`): the folded
    weights of :class:`~llamascope_sdk.core.fold.Folded` and the names below."""

    @property
    def name(self) -> str: ...

    @property
    def d_model(self) -> int: ...

    @property
    def d_sae(self) -> int: ...

    @property
    def is_transcoder(self) -> bool: ...

    def gate_threshold(self, features: torch.Tensor | None = None) -> torch.Tensor: ...

    def raw_state_dict(self) -> dict[str, torch.Tensor]: ...


def write_sae_folder(out: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """:func:`~llamascope_sdk.base.atomic.write_folder` for an SAE folder of any format: written
    whole, replacing only a folder that :func:`~llamascope_sdk.loading.formats.layouts.replaceable_sae_folder`
    accepts (an SAE folder the SDK wrote)."""
    return write_folder(out, write, replaceable=replaceable_sae_folder)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object")
    return data


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SaeNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def need(tensors: dict[str, torch.Tensor], names: tuple[str, ...], where: str) -> torch.Tensor:
    """The first of ``names`` present in ``tensors``; a clear error naming them otherwise."""
    for n in names:
        if n in tensors:
            return tensors[n]
    raise CorruptCheckpointError(f"{where}: no tensor named {' or '.join(repr(n) for n in names)} "
                                 f"(found {sorted(tensors)})")


def matrix(t: torch.Tensor, name: str, where: str, dims: str) -> torch.Tensor:
    """``t`` if it is a 2-D floating-point tensor; a one-line error naming its shape otherwise
    (``dims`` says what the two dimensions are, e.g. ``"[d_in, d_sae]"``)."""
    if t.ndim != 2 or not t.is_floating_point():
        raise CorruptCheckpointError(f"{where}: tensor '{name}' has shape {list(t.shape)} and dtype "
                                     f"{str(t.dtype).removeprefix('torch.')}; expected a 2-D "
                                     f"floating-point matrix {dims}")
    return t


def threshold_vector(t: torch.Tensor, name: str, d_sae: int, where: str) -> torch.Tensor:
    """A JumpReLU threshold as [d_sae] float64: a scalar is spread to every feature; any
    other shape, or a NaN, is refused in one line naming it (a NaN feature would never fire)."""
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, d_sae)):
        raise CorruptCheckpointError(f"{where}: tensor '{name}' has shape {list(t.shape)}; expected "
                                     f"[{d_sae}] (one threshold per feature) or a scalar")
    t = t.double().reshape(-1).expand(d_sae)
    nan = torch.isnan(t).nonzero().flatten()
    if nan.numel():
        raise CorruptCheckpointError(
            f"{where}: tensor '{name}' holds NaN for {nan.numel()} of {d_sae} features (first: "
            f"feature {int(nan[0])}); a NaN threshold is no threshold (the feature could never "
            "fire)", hint="fix the checkpoint (e.g. set those thresholds to inf to switch the "
                          "features off, or to a value)")
    return t


def check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str, where: str) -> None:
    if tuple(t.shape) != shape:
        raise CorruptCheckpointError(f"{where}: tensor '{name}' has shape {list(t.shape)}, "
                                     f"expected {list(shape)}")


@torch.no_grad()
def plain_record(*, W_e: torch.Tensor, b_e: torch.Tensor, W_d: torch.Tensor, b_d: torch.Tensor,
                 act_fn: str, hook_point_in: str, hook_point_out: str,
                 threshold: torch.Tensor | float | None = None, top_k: int | None = None,
                 rank_by_decoder_norm: bool = False, source_format: str,
                 source_config: dict[str, Any] | None = None,
                 file_dtype: torch.dtype | None = None,
                 extra: dict[str, Any] | None = None, model_name: str | None = None) -> Plain:
    """The :class:`Plain` record of the plain form in the module docstring (exact mapping).

    Args:
        W_e, b_e: encoder [F, D] and bias [F]; W_d [F, D] decoder rows of any norm, b_d [D].
        threshold: for jumprelu, the gate on ``pre`` (scalar or [F]); ``relu(pre)`` is kept
            where ``pre > threshold``.
        rank_by_decoder_norm: for topk, whether the format ranks by ``n_i * pre`` (values
            then also scaled by n_i, as SAELens's ``rescale_acts_by_decoder_norm``) rather
            than by ``pre``.
        source_format, source_config: recorded in hyperparams (``converted_from``).
        file_dtype: the dtype the source stored (what save_pretrained writes back).
    """
    f_dim, d_dim = W_e.shape
    where = f"{source_format} checkpoint"
    check_shape(b_e, (f_dim,), "encoder bias", where)
    check_shape(W_d, (f_dim, d_dim), "decoder", where)
    check_shape(b_d, (d_dim,), "decoder bias", where)
    if act_fn not in ("jumprelu", "topk", "relu"):
        raise UnsupportedFormatError(f"activation {act_fn!r} is not supported (jumprelu, topk, relu)")
    hp: dict[str, Any] = {
        "d_model": d_dim, "d_sae": f_dim, "hook_point_in": hook_point_in,
        "hook_point_out": hook_point_out, "act_fn": act_fn, "jump_relu_threshold": 0.0,
        "norm_activation": "inference", "top_k": int(top_k) if top_k else min(50, f_dim),
        "sparsity_include_decoder_norm": bool(rank_by_decoder_norm) if act_fn == "topk" else True,
        "use_decoder_bias": True, "apply_decoder_bias_to_pre_encoder": False,
        "expansion_factor": f_dim // d_dim if f_dim % d_dim == 0 else None,
        "dtype": str(file_dtype or W_e.dtype),
        "converted_from": {"format": source_format, **({"config": source_config} if source_config else {})},
        **(extra or {}),
    }
    if act_fn == "topk" and not top_k:
        raise UnsupportedFormatError(f"{where}: a top-k checkpoint needs k")
    f32 = torch.float64
    W_e64, b_e64, W_d64 = W_e.to(f32), b_e.to(f32), W_d.to(f32)
    norms = torch.linalg.vector_norm(W_d64, dim=1)
    thr_folded: torch.Tensor | None = None
    if act_fn == "jumprelu":
        t = torch.as_tensor(0.0 if threshold is None else threshold, dtype=f32).expand(f_dim)
        thr_folded = t.clamp(min=0) * norms  # relu(pre)*1[pre>t] == pre*1[pre>max(t,0)]
        # A zero decoder row never fires in this SDK (its contribution is nothing anyway).
        thr_folded = torch.where(norms > 0, thr_folded, torch.full_like(thr_folded, math.inf))
        finite = thr_folded[torch.isfinite(thr_folded)]
        hp["jump_relu_threshold"] = float(finite[0]) if finite.numel() else 0.0
    raw = {"encoder.weight": W_e64.to(torch.float32), "encoder.bias": b_e64.to(torch.float32),
           "decoder.weight": W_d64.t().to(torch.float32).contiguous(),
           "decoder.bias": b_d.to(torch.float32)}
    return Plain(Hyperparams.from_dict(hp, source=where), raw, file_dtype or W_e.dtype, thr_folded,
                 model_name=model_name)


def collapse_threshold(thr: torch.Tensor) -> torch.Tensor:
    """One scalar when the per-feature values differ only by float32 rounding (a stored
    logarithm, a unit row norm of 1 +- 1e-7): relative spread <= 1e-6; else the vector."""
    lo, hi = float(thr.min()), float(thr.max())
    if math.isfinite(hi) and hi - lo <= 1e-6 * max(abs(hi), 1e-30):
        return torch.tensor(float(thr.median()), dtype=torch.float64)
    return thr
