"""Folding the release tensors into inference weights (spec 3.2), and unfolding them again.

``fold_into`` turns the raw training-space tensors of checkpoints/final.safetensors into the
folded parameters of an :class:`~llamascope_sdk.loading.sae.SAE`::

    W_enc[i] = W_e[i] ||d_i|| s_in / s_out,  b_enc[i] = b_e[i] ||d_i|| / s_out
    W_dec[i] = d_i / ||d_i||,                b_dec    = b_d / s_out

keeping ||d_i|| so that ``unfold`` can write the original tensors back for ``save_pretrained``.

Every folded tensor is finite *in the dtype it is stored in*, or the load fails: a value that is
finite in the file can still overflow once scaled and cast (float16 stops at 65504), and that is
reported as :class:`~llamascope_sdk.base.errors.DtypeOverflowError` naming the tensor and the dtype.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from llamascope_sdk.base.errors import CorruptCheckpointError, DtypeOverflowError
from llamascope_sdk.core.hyperparams import Hyperparams


class Folded(Protocol):
    """What folding reads and writes: the SAE's folded parameters (see :class:`~.sae.SAE`)."""

    hyperparams: Hyperparams
    file_dtype: torch.dtype

    @property
    def W_enc(self) -> torch.Tensor: ...  # [F, D]

    @property
    def b_enc(self) -> torch.Tensor: ...  # [F]

    @property
    def W_dec(self) -> torch.Tensor: ...  # [F, D], unit rows

    @property
    def b_dec(self) -> torch.Tensor: ...  # [D]

    @property
    def decoder_norm(self) -> torch.Tensor: ...  # [F] fp32

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

#: Features per block when a bf16/fp16 decoder is normalised through an fp32 scratch.
_LOAD_BLOCK = 1024


@torch.no_grad()
def fold_into(sae: Folded, get: Any) -> None:
    """Fill the inference weights from raw tensors. ``get(name)`` returns one raw tensor
    of the release file (spec 2.3); ``sae``'s parameters are overwritten in place.

    Fold in fp32 and cast once. It is one function (81 lines) because the steps share buffers
    whose reuse is the point; performance facts measured at 8x size on a 2-core CPU set the
    shape of this code:

    * Transposes use torch's blocked transpose kernel, which ``copy_`` takes only for a
      transposed *contiguous* source of the *same* dtype; a cast and a transpose in one
      ``copy_`` is ~5x slower. The bf16 decoder is transposed whole in bf16, into the
      memory of ``W_enc`` before the encoder is read (no temporary); for an fp32 target
      it is then cast, normed and divided as whole contiguous tensors: four
      parallel regions instead of ~130 block ops, which matters on a loaded machine,
      where every OpenMP region waits for a descheduled thread.
    * Norms are taken along contiguous rows: ``vector_norm(dim=0)`` of a [D, b] block
      is ~20x slower than ``dim=1`` of [b, D] rows.
    * ``torch.isfinite`` on a bf16 tensor costs ~1 s per 134M elements, more than the
      whole fold, so finiteness is read off reductions that propagate NaN/inf: the decoder
      row norms, and the row sums (fp32/fp64 target) or row max/min (bf16/fp16 target,
      checked after casting them, which rounds like the largest element does) of the folded
      encoder. Only when one is not finite is the raw tensor scanned, to name the culprit
      exactly. Unit decoder rows cannot overflow; the [F]/[D] biases are checked as stored.
    """
    hp = sae.hyperparams
    s_in, s_out = hp.scale_in, hp.scale_out
    f_dim, d_dim = hp.d_sae, hp.d_model
    dev = sae.device
    compute = torch.float32 if sae.dtype != torch.float64 else torch.float64
    dec_raw = get("decoder.weight")  # [D, F]
    # The transposed raw decoder lives in W_enc's (not yet written) memory when it fits:
    # no extra allocation and no extra page faults.
    if sae.W_enc.element_size() >= dec_raw.element_size() and dec_raw.dtype != compute:
        dec_FD = sae.W_enc.view(-1).view(dec_raw.dtype)[:f_dim * d_dim].view(f_dim, d_dim)
        dec_FD.copy_(dec_raw.t())
    elif dec_raw.dtype == compute:
        dec_FD = dec_raw.t()  # strided view; cast + normalise below read it in blocks
    else:
        dec_FD = torch.empty((f_dim, d_dim), device=dev, dtype=dec_raw.dtype)
        dec_FD.copy_(dec_raw.t())
    if sae.dtype == compute:
        sae.W_dec.copy_(dec_FD)
        norms_c = torch.linalg.vector_norm(sae.W_dec, dim=1)
        sae.W_dec.div_(torch.where(norms_c > 0, norms_c, torch.ones_like(norms_c))[:, None])
    else:
        # bf16/fp16 weights: normalise each block of rows in an fp32 scratch, cast once.
        norms_c = torch.empty(f_dim, device=dev, dtype=compute)
        blk = _LOAD_BLOCK * 4
        scratch_bD = torch.empty(min(blk, f_dim), d_dim, device=dev, dtype=compute)
        for j in range(0, f_dim, blk):
            b = min(blk, f_dim - j)
            rows_bD = scratch_bD[:b]
            rows_bD.copy_(dec_FD[j:j + b])
            n = torch.linalg.vector_norm(rows_bD, dim=1)
            norms_c[j:j + b] = n
            rows_bD.div_(torch.where(n > 0, n, torch.ones_like(n))[:, None])
            sae.W_dec[j:j + b].copy_(rows_bD)
        del scratch_bD
    del dec_FD
    norms = norms_c.to(torch.float32)
    if not bool(torch.isfinite(norms).all()):
        _check_finite(dec_raw, "decoder.weight")
        raise CorruptCheckpointError("tensor 'decoder.weight' has columns whose norm overflows")
    # A feature with an all-zero decoder column can never fire in the reference (a_i = 0).
    enc_scale = (norms_c * (s_in / s_out))[:, None]
    del dec_raw
    enc_raw = get("encoder.weight")
    finite = True
    if sae.dtype == compute:
        sae.W_enc.copy_(enc_raw)
        sae.W_enc.mul_(enc_scale)
        # A sum of finite values can itself overflow: confirm exactly before failing.
        finite = bool(torch.isfinite(sae.W_enc.sum(dim=1)).all()) or bool(
            torch.isfinite(sae.W_enc).all())
    else:
        for j in range(0, f_dim, _LOAD_BLOCK * 4):
            sl = slice(j, j + _LOAD_BLOCK * 4)
            # copy=True: an fp32 raw tensor must not be scaled in place (it is the caller's).
            block = enc_raw[sl].to(device=dev, dtype=compute, copy=True).mul_(enc_scale[sl])
            if finite:  # NaN/inf propagate through amax/amin; the cast max rounds like the data
                rows_peak = torch.maximum(block.amax(dim=1), block.amin(dim=1).neg())
                finite = bool(torch.isfinite(rows_peak.to(sae.dtype)).all())
            sae.W_enc[sl].copy_(block)
    if not finite:
        _check_finite(enc_raw, "encoder.weight")
        peak = float((enc_raw.abs().amax(dim=1).double() * enc_scale[:, 0].double()).max())
        raise _overflow("W_enc", "encoder.weight", sae.dtype, peak)
    del enc_raw
    b_e = get("encoder.bias").to(device=dev, dtype=compute)
    _check_finite(b_e, "encoder.bias")
    sae.b_enc.copy_(b_e * norms_c / s_out)
    if not bool(torch.isfinite(sae.b_enc).all()):
        raise _overflow("b_enc", "encoder.bias", sae.dtype,
                        float((b_e.double() * norms_c.double()).abs().max()) / s_out)
    if hp.use_decoder_bias:
        b_d = get("decoder.bias").to(device=dev, dtype=compute)
        _check_finite(b_d, "decoder.bias")
        sae.b_dec.copy_(b_d / s_out)
        if not bool(torch.isfinite(sae.b_dec).all()):
            raise _overflow("b_dec", "decoder.bias", sae.dtype,
                            float(b_d.double().abs().max()) / s_out)
    else:
        sae.b_dec.zero_()
    sae.decoder_norm.copy_(norms)


@torch.no_grad()
def unfold(sae: Folded) -> dict[str, torch.Tensor]:
    """The training-space tensors of the release file, unfolded, in the file's dtype."""
    hp = sae.hyperparams
    s_in, s_out = hp.scale_in, hp.scale_out
    compute = torch.float64 if sae.dtype == torch.float64 else torch.float32
    n = sae.decoder_norm.to(device=sae.device, dtype=compute)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    out = {
        "encoder.weight": (sae.W_enc.to(compute) * (s_out / s_in) / safe_n[:, None]),
        "encoder.bias": sae.b_enc.to(compute) * s_out / safe_n,
        "decoder.weight": (sae.W_dec.to(compute) * n[:, None]).t(),
    }
    if hp.use_decoder_bias:
        out["decoder.bias"] = sae.b_dec.to(compute) * s_out
    return {k: v.to(device="cpu", dtype=sae.file_dtype).contiguous() for k, v in out.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _overflow(what: str, raw: str, dtype: torch.dtype, peak: float) -> DtypeOverflowError:
    """The error for a folded tensor that is finite in the file but not in ``dtype``."""
    wider = [d for d in (torch.float32, torch.bfloat16, torch.float64)
             if d != dtype and torch.finfo(d).max > max(peak, torch.finfo(dtype).max)]
    if wider:
        names = [dtype_name(d) for d in wider[:2]]
        fix = f"load in {' or '.join(names)}"
    else:
        fix = "the folded values exceed every float dtype; the file is corrupt"
    return DtypeOverflowError(
        f"{what} (folded '{raw}') overflows {dtype_name(dtype)} (max |value| {peak:.2g} > "
        f"{torch.finfo(dtype).max:.5g}); {fix}", hint=fix)


def _check_finite(t: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CorruptCheckpointError(f"tensor '{name}' holds {bad} non-finite values (NaN or inf)",
                                     hint="the file is corrupt; download it again")

