"""Interventions and attach refuse unusable arguments with one-line messages that name the
argument: feature indices must be integers in range, strengths/values/factors/means finite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llamascope_sdk import SAE, Ablate, Clamp, FeatureStats, Scale, Steer, attach
from llamascope_sdk.base.errors import FeatureIndexError, InputError

from .helpers import raw_tensors, release_hyperparams

NEED_INT = "feature indices must be integers"


@pytest.fixture(scope="module")
def sae() -> SAE:
    return SAE.from_raw(release_hyperparams(d_model=64, d_sae=256, layer=1, threshold=0.05),
                        raw_tensors(64, 256, 0, torch.float32))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(("features", "fragment"), [
    ([4154.7], "feature index 4154.7 (float) at position 0 is not an integer"),
    ([3.0], "feature index 3.0 (float) at position 0 is not an integer"),
    (3.0, "feature index 3.0 (float) is not an integer"),
    ([1, True], "feature index True (bool) at position 1 is not an integer"),
    (True, "feature index True (bool) is not an integer"),
    ([[1, 2]], "nested feature list ([1, 2] at position 0)"),
    ([1, [2]], "nested feature list ([2] at position 1)"),
    (torch.tensor([[1, 2]]), "got a tensor of shape [1, 2]"),
    (torch.tensor([1.0, 2.0]), "got a float32 tensor"),
    (torch.tensor([True]), "got a bool tensor"),
    (np.array([1.5]), "got a float64 tensor"),
    ("7", "feature index '7' (str) is not an integer"),
])
def test_feature_indices_must_be_integers(sae, features, fragment):
    with pytest.raises(InputError) as exc:
        Steer(sae, features, 1.0)
    msg = _one_line(exc)
    assert fragment in msg and NEED_INT in msg


@pytest.mark.parametrize("features", [
    7, [7, 9], (7,), range(7, 9), np.int64(7), [np.int32(7), 9], np.array([7, 9]),
    torch.tensor(7), torch.tensor([7, 9], dtype=torch.int8), torch.tensor([7, 9], dtype=torch.int16),
    torch.tensor([7, 9], dtype=torch.int32), torch.tensor([7, 9]), torch.tensor([7, 9], dtype=torch.uint8),
    [torch.tensor(7), 9],
])
def test_integer_indices_are_accepted(sae, features):
    iv = Steer(sae, features, 1.0)
    assert iv.idx.dtype == torch.long and iv.idx.tolist()[0] == 7


def test_out_of_range_index(sae):
    with pytest.raises(FeatureIndexError, match=r"feature index 256 is out of range; allowed are 0\.\.255"):
        Clamp(sae, torch.tensor([3, 256]), 0.0)
    with pytest.raises(FeatureIndexError, match="feature index -1"):
        Ablate(sae, [-1])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(("make", "what"), [
    (lambda s, v: Steer(s, [1, 2], v), "Steer strength"),
    (lambda s, v: Steer(s, [1, 2], [1.0, v]), "Steer strength"),
    (lambda s, v: Steer(s, [1], torch.tensor([v])), "Steer strength"),
    (lambda s, v: Clamp(s, [1], v), "Clamp value"),
    (lambda s, v: Scale(s, [1, 2], np.array([2.0, v])), "Scale factor"),
    (lambda s, v: Ablate(s, [1], "mean", mean=v), "Ablate mean"),
])
def test_non_finite_numbers_are_refused(sae, make, what, bad):
    with pytest.raises(InputError) as exc:
        make(sae, bad)
    msg = _one_line(exc)
    assert msg.startswith(f"{what} must be finite, got {bad}") and "give a finite number" in msg


@pytest.mark.parametrize(("value", "fragment"), [
    (1e39, "Steer strength 1e+39 overflows float32"),
    ("x", "Steer strength must be a number or a list of numbers, got 'x'"),
    (True, "Steer strength must be a number, got a bool"),
    ([[1.0, 2.0]], "Steer strength must be one value or a flat list, got shape [1, 2]"),
    ([1.0, 2.0, 3.0], "Steer strength has 3 values for 2 features"),
])
def test_other_bad_strengths(sae, value, fragment):
    with pytest.raises(InputError) as exc:
        Steer(sae, [1, 2], value)
    assert fragment in _one_line(exc)


def _stats(typical: torch.Tensor) -> FeatureStats:
    n = typical.numel()
    return FeatureStats(typical=typical, frequency=torch.full((n,), 0.1), mean=torch.zeros(n),
                        n_tokens=100)


def test_relative_steering_needs_a_finite_typical_activation():
    s = SAE.from_raw(release_hyperparams(d_model=64, d_sae=256, layer=1, threshold=0.05),
                     raw_tensors(64, 256, 0, torch.float32))
    s.stats = _stats(torch.ones(256))
    assert Steer(s, [4], 2.0, relative=True).coefficients().tolist() == [2.0]
    s.stats.typical[4] = math.inf  # mutated after the (finite-checked) assignment
    with pytest.raises(InputError) as exc:
        Steer(s, [4], 2.0, relative=True)
    assert "feature 4 has a non-finite typical activation (inf)" in _one_line(exc)
    s.stats.typical[4] = 1e38
    with pytest.raises(InputError, match="overflows float32"):
        Steer(s, [4], 1e3, relative=True)
    with pytest.raises(InputError, match="relative must be True or False"):
        Steer(s, [4], 1.0, relative="yes")


@pytest.mark.parametrize(("positions", "fragment"), [
    ([True, 2], "positions=[True, 2]"),
    ([1.5], "positions=[1.5]"),
    (slice(0.5, None), "positions slice start 0.5 is not an int"),
    (slice(0, 4, 0), "positions slice step must be positive, got 0"),
    ("generate", "positions='generate'"),
])
def test_bad_positions(sae, positions, fragment):
    with pytest.raises(InputError) as exc:
        Steer(sae, [1], 1.0, positions=positions)
    msg = _one_line(exc)
    assert fragment in msg and "allowed are 'all', 'prompt', 'generated'" in msg


# ---------------------------------------------------------------- attach arguments
def test_attach_refuses_the_same_sae_twice(tiny_llama, sae):
    with pytest.raises(ValueError, match=r"the SAE object 'sae' is given twice; pass it once"):
        attach(tiny_llama, [sae, sae])
    with pytest.raises(ValueError, match="given twice"):
        attach(tiny_llama, {"a": sae, "b": sae})
    with attach(tiny_llama, [sae]) as h:  # once is fine
        assert list(h._chunks) == []


def test_attach_argument_checks(tiny_llama, sae):
    iv = Steer(sae, [1], 1.0)
    with pytest.raises(ValueError, match=r"the same Steer object is given twice \(position 1\)"):
        attach(tiny_llama, interventions=[iv, iv])
    with pytest.raises(TypeError, match="must be Steer/Clamp/Scale/Ablate, got int at position 0"):
        attach(tiny_llama, interventions=[3])
    with pytest.raises(InputError, match="splice must be True or False, got 'yes'"):
        attach(tiny_llama, [sae], splice="yes")
    with pytest.raises(InputError, match="include_special must be True or False"):
        attach(tiny_llama, [sae], include_special=None)
    with pytest.raises(InputError, match="special_ids must be token ids"):
        attach(tiny_llama, [sae], special_ids=[1, "2"])
    with pytest.raises(ValueError, match=r"capture: unknown names \['feature'\]"):
        attach(tiny_llama, [sae], capture="feature")
    with attach(tiny_llama, [sae], capture="inputs") as h, torch.no_grad():
        tiny_llama(input_ids=torch.tensor([[1, 5, 6]]))
    assert set(h.inputs) == {"sae"} and h.features == {}
