"""One Steer: the pool's steer from decoder rows (an unloaded SAE) and Steer on a loaded SAE
share the strength rule, the row normalisation and the checks, so the same edit gives the same
vector, and the same bad edit the same error class and message, either way."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llamascope_sdk import SAE, FeatureStats, Steer
from llamascope_sdk.steering.pool import SaePool
from llamascope_sdk.steering.row_edits import VectorEdit
from tests.helpers import make_release

D, F = 64, 256


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = make_release(tmp_path / "sae", layer=1, d_model=D, d_sae=F, seed=3)
    typical = torch.rand(F) + 0.5
    typical[9] = 0.0  # a feature that never fired on the stats text
    typical[1] = 2.0  # 2e38 x 2 overflows float32
    FeatureStats(typical=typical, frequency=torch.full((F,), 0.01), mean=typical / 10,
                 n_tokens=1000).save(out)
    return out


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A release folder without feature statistics."""
    return make_release(tmp_path / "bare", layer=1, d_model=D, d_sae=F, seed=4)


BAD_EDITS = [
    ([F], 1.0, False),                    # out of range
    ([-1], 1.0, False),                   # negative
    ([1.5], 1.0, False),                  # not an integer
    ([True], 1.0, False),                 # a bool
    ([[1, 2]], 1.0, False),               # nested
    ([], 1.0, False),                     # no features
    ([1], float("nan"), False),           # NaN strength
    ([1], float("inf"), False),           # inf strength
    ([1], True, False),                   # a bool strength
    ([1, 2], [1.0, 2.0, 3.0], False),     # wrong count of strengths
    ([1], "strong", False),               # not a number
    ([1], 1.0, "yes"),                    # relative not a bool
    ([9], 2.0, True),                     # relative on a feature that never fired
    ([1], 2e38, True),                    # relative strength x typical overflows fp32
]


def _error(fn) -> tuple[type, str]:
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("features,strength,relative", BAD_EDITS)
def test_the_same_bad_edit_gives_the_same_error_loaded_or_not(folder, features, strength,
                                                              relative) -> None:
    loaded = SAE.from_pretrained(folder)
    via_steer = _error(lambda: Steer(loaded, features, strength, relative=relative).coefficients())
    pool = SaePool(10**9)
    via_pool = _error(lambda: pool.steer_edit(str(folder), features, strength, relative=relative))
    assert pool.loaded() == []  # the pool read rows only
    assert via_pool == via_steer
    assert "\n" not in via_steer[1]


def test_relative_without_stats_is_the_same_error_loaded_or_not(bare) -> None:
    loaded = SAE.from_pretrained(bare)
    via_steer = _error(lambda: Steer(loaded, [1], 1.0, relative=True).coefficients())
    via_pool = _error(lambda: SaePool(10**9).steer_edit(str(bare), [1], 1.0, relative=True))
    assert via_pool == via_steer


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("relative", [False, True])
def test_rows_steer_equals_the_loaded_steer_bit_for_bit(folder, dtype, relative) -> None:
    pool = SaePool(10**9, dtype=dtype)
    edit, _ = pool.steer_edit(str(folder), [3, 200, 17], [2.0, -1.5, 0.25], relative=relative)
    assert isinstance(edit, VectorEdit) and pool.loaded() == []
    full = SAE.from_pretrained(folder, dtype=dtype)
    iv = Steer(full, [3, 200, 17], [2.0, -1.5, 0.25], relative=relative)
    want = iv.coefficients().to(full.dtype) @ full.W_dec[iv.idx]
    assert edit.vector.dtype == want.dtype and torch.equal(edit.vector, want)
