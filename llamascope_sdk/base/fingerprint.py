"""A fingerprint of an SAE's weights, to tell whether two SAEs are the same one.

Two SAEs of the same width can be different SAEs (another layer, another run, another import),
so a width check is not enough to know that mined statistics belong to an SAE. The fingerprint
is 64 weights read at fixed, spread-out positions of the folded encoder and decoder (plus the
shapes). It is compared with a tolerance, not bit for bit, so the same SAE loaded in bfloat16
or float16, or folded on another device, still matches, while two different SAEs (whose weights
are unrelated at those positions) do not.
"""

from __future__ import annotations

from typing import Any

import torch

METHOD = "weights-probe-v1"
_N = 32  # positions read in W_dec and in W_enc each
#: Largest difference allowed, as a fraction of the largest probed value of each matrix.
#: bfloat16 rounding moves a value by at most 0.4% of itself; unrelated weights differ by ~100%.
TOLERANCE = 0.02


def _positions(d_sae: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(_N, dtype=torch.long)
    return (k * 2654435761 + 12345) % d_sae, (k * 40503 + 17) % d_model


def fingerprint(sae: Any) -> dict[str, Any]:
    """``{"method", "d_sae", "d_model", "W_dec", "W_enc"}``: JSON-ready (for a manifest)."""
    f, d = int(sae.d_sae), int(sae.d_model)
    rows, cols = _positions(f, d)
    with torch.no_grad():
        dec = sae.W_dec.detach()[rows.to(sae.W_dec.device), cols.to(sae.W_dec.device)]
        enc = sae.W_enc.detach()[rows.to(sae.W_enc.device), cols.to(sae.W_enc.device)]
    return {"method": METHOD, "d_sae": f, "d_model": d,
            "W_dec": [float(f"{v:.6g}") for v in dec.float().cpu().tolist()],
            "W_enc": [float(f"{v:.6g}") for v in enc.float().cpu().tolist()]}


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints (empty: the same SAE, within :data:`TOLERANCE`)."""
    if a.get("method") != b.get("method"):
        return [f"fingerprint method {a.get('method')!r} vs {b.get('method')!r}"]
    out = [f"{k} {a.get(k)} vs {b.get(k)}" for k in ("d_sae", "d_model") if a.get(k) != b.get(k)]
    if out:
        return out
    for key in ("W_dec", "W_enc"):
        x = torch.tensor(a[key], dtype=torch.float64)
        y = torch.tensor(b[key], dtype=torch.float64)
        scale = float(torch.maximum(x.abs().max(), y.abs().max()))
        if x.shape != y.shape or float((x - y).abs().max()) > TOLERANCE * scale + 1e-12:
            out.append(f"{key} weights differ")
    return out


def is_fingerprint(value: Any) -> bool:
    """A well-formed fingerprint (as read back from JSON)."""
    return (isinstance(value, dict) and value.get("method") == METHOD
            and all(isinstance(value.get(k), int) for k in ("d_sae", "d_model"))
            and all(isinstance(value.get(k), list) and len(value[k]) == _N
                    and all(isinstance(v, (int, float)) for v in value[k])
                    for k in ("W_dec", "W_enc")))


__all__ = ["METHOD", "TOLERANCE", "differences", "fingerprint", "is_fingerprint"]
