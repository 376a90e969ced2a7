"""Loading in any dtype gives finite folded weights or fails naming the tensor and the dtype:
a value that is finite in the file can overflow once folded and cast (float16 ends at 65504)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import DtypeOverflowError, LlamascopeError

from .helpers import raw_tensors, release_hyperparams, write_release

DTYPES = ["float32", "bfloat16", "float16", "float64"]


def _tensors(where: str, value: float) -> dict:
    """fp32 release tensors with decoder column 5 of norm exactly 2 and one large value."""
    raw = raw_tensors(64, 256, 0, torch.float32)
    col = raw["decoder.weight"][:, 5]
    raw["decoder.weight"][:, 5] = 2 * col / col.norm()
    if where == "encoder.weight":
        raw["encoder.weight"][5, 7] = value
    elif where == "encoder.bias":
        raw["encoder.bias"][5] = value
    else:
        raw["decoder.bias"][9] = value
    return raw


def _hp(**kw) -> dict:  # norm_in == norm_out == sqrt(64): s_in = s_out = 1, folding = * ||d_i||
    return release_hyperparams(d_model=64, d_sae=256, norm_in=8.0, norm_out=8.0, **kw)


@pytest.mark.parametrize(("raw_name", "folded", "value", "peak"), [
    ("encoder.weight", "W_enc", 60000.0, "1.2e+05"),
    ("encoder.bias", "b_enc", 50000.0, "1e+05"),
    ("decoder.bias", "b_dec", 70000.0, "7e+04"),
])
def test_float16_overflow_is_refused_naming_tensor_and_dtype(tmp_path: Path, raw_name, folded,
                                                             value, peak):
    folder = write_release(tmp_path / "sae", _hp(), _tensors(raw_name, value))
    with pytest.raises(DtypeOverflowError) as exc:
        SAE.from_pretrained(folder, dtype="float16")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == (f"{folded} (folded '{raw_name}') overflows float16 (max |value| {peak} > "
                   "65504); load in float32 or bfloat16")
    assert isinstance(exc.value, LlamascopeError) and isinstance(exc.value, ValueError)
    with pytest.raises(DtypeOverflowError, match="overflows float16"):
        SAE.from_raw(_hp(), _tensors(raw_name, value), dtype=torch.float16)
    for ok in ("float32", "bfloat16", "float64"):  # the same file loads in a wider dtype
        sae = SAE.from_pretrained(folder, dtype=ok)
        for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec):
            assert bool(torch.isfinite(p.float()).all())


def test_values_just_inside_float16_load(tmp_path: Path):
    """65504 is the largest float16; 32000 * ||d|| = 64000 fits and is kept."""
    folder = write_release(tmp_path / "sae", _hp(), _tensors("encoder.weight", 32000.0))
    sae = SAE.from_pretrained(folder, dtype="float16")
    assert float(sae.W_enc[5, 7]) == pytest.approx(64000.0, rel=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_float32_range_overflow_suggests_float64(tmp_path: Path, dtype):
    folder = write_release(tmp_path / "sae", _hp(), _tensors("encoder.weight", 3e38))
    with pytest.raises(DtypeOverflowError,
                       match=rf"^W_enc \(folded 'encoder.weight'\) overflows {dtype} "
                             r"\(max \|value\| 6e\+38 > .*\); load in float64$"):
        SAE.from_pretrained(folder, dtype=dtype)
    assert bool(torch.isfinite(SAE.from_pretrained(folder, dtype="float64").W_enc).all())


def test_threshold_overflowing_the_dtype_is_refused(tmp_path: Path):
    folder = write_release(tmp_path / "sae", _hp(threshold=1e5), raw_tensors(64, 256, 0))
    with pytest.raises(DtypeOverflowError,
                       match=r"^jump_relu_threshold=100000 overflows float16; load in float32$"):
        SAE.from_pretrained(folder, dtype="float16")
    assert float(SAE.from_pretrained(folder, dtype="float32").threshold) == 1e5


@pytest.mark.parametrize("dtype", DTYPES)
def test_ordinary_release_loads_finite_in_every_dtype(tmp_path: Path, dtype):
    folder = write_release(tmp_path / "sae", _hp(), raw_tensors(64, 256, 0))
    sae = SAE.from_pretrained(folder, dtype=dtype)
    assert sae.dtype == getattr(torch, dtype)
    for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold):
        assert bool(torch.isfinite(p.float()).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_from_raw_leaves_the_callers_tensors_alone(dtype):
    raw = raw_tensors(64, 256, 0, torch.float32)
    before = {k: v.clone() for k, v in raw.items()}
    SAE.from_raw(_hp(), raw, dtype=dtype)
    for k, v in raw.items():
        assert torch.equal(v, before[k]), k
