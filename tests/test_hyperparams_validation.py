"""hyperparams.json values that would load a broken SAE are refused with one line naming the
field; the checkpoint header is checked against them before any weight is allocated."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import CorruptCheckpointError, HyperparamsError
from llamascope_sdk.core.hyperparams import Hyperparams

from .helpers import raw_tensors, release_hyperparams, write_release


def _hp(**changes) -> dict:
    hp = release_hyperparams(d_model=64, d_sae=256)
    for key, value in changes.items():
        if key in ("in", "out"):
            hp["dataset_average_activation_norm"][key] = value
        else:
            hp[key] = value
    return hp


def _refused(raw: dict) -> str:
    with pytest.raises(HyperparamsError) as exc:
        Hyperparams.from_dict(raw, source="hyperparams.json")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("hyperparams.json is invalid: ")
    return msg


@pytest.mark.parametrize(("key", "value"), [("in", float("inf")), ("out", float("inf")),
                                            ("in", float("nan")), ("out", float("-inf"))])
def test_dataset_norm_must_be_finite(key, value):
    msg = _refused(_hp(**{key: value}))
    assert f"field 'dataset_average_activation_norm.{key}': Input should be a finite number" in msg


@pytest.mark.parametrize(("key", "value"), [("in", 0.0), ("out", -3.0)])
def test_dataset_norm_must_be_positive(key, value):
    msg = _refused(_hp(**{key: value}))
    assert f"field 'dataset_average_activation_norm.{key}': Input should be greater than 0" in msg


def test_infinity_in_the_json_file_is_refused(tmp_path: Path):
    raw = raw_tensors(64, 256, 0)
    folder = write_release(tmp_path / "sae", _hp(), raw)
    text = (folder / "hyperparams.json").read_text().replace('"in": 8.0625', '"in": Infinity')
    assert "Infinity" in text
    (folder / "hyperparams.json").write_text(text)
    with pytest.raises(HyperparamsError,
                       match=r"field 'dataset_average_activation_norm.in': Input should be a "
                             r"finite number \(got inf\)"):
        SAE.from_pretrained(folder)


@pytest.mark.parametrize("field", ["d_model", "d_sae", "top_k", "expansion_factor"])
@pytest.mark.parametrize("value", [True, 4.0, 256.0, "64"])
def test_int_fields_are_strict(field, value):
    msg = _refused(_hp(**{field: value}))
    assert f"field '{field}': Input should be a valid integer (got {value!r})" in msg


def test_json_ints_are_accepted():
    hp = Hyperparams.from_dict(json.loads(json.dumps(_hp(top_k=256))))
    assert (hp.d_model, hp.d_sae, hp.top_k, hp.expansion_factor) == (64, 256, 256, 4)
    assert type(hp.d_model) is int


def test_top_k_larger_than_d_sae_is_refused():
    msg = _refused(_hp(top_k=257))
    assert "top_k=257 is larger than d_sae=256; allowed are 1..256" in msg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("act_fn", ["jumprelu", "relu"])
def test_threshold_must_be_finite(value, act_fn):
    msg = _refused(_hp(jump_relu_threshold=value, act_fn=act_fn))
    assert "field 'jump_relu_threshold': Input should be a finite number" in msg


def test_huge_d_sae_fails_on_the_header_before_allocating(tmp_path: Path, monkeypatch):
    """hyperparams claims d_sae = 10**12 (4 TB of fp32 weights); the 256-feature file's header
    is read first, so the load fails at once instead of allocating."""
    folder = write_release(tmp_path / "sae", _hp(d_sae=10**12), raw_tensors(64, 256, 0))
    made = []
    real_empty = torch.empty

    def spy(*a, **k):
        made.append(a)
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", spy)
    start = time.perf_counter()
    with pytest.raises(CorruptCheckpointError,
                       match=r"tensor '.*' has shape \[.*\], but hyperparams.json \(d_model=64, "
                             r"d_sae=1000000000000\) requires"):
        SAE.from_pretrained(folder)
    assert time.perf_counter() - start < 5
    assert made == []  # no weight was allocated


def test_from_raw_checks_shapes_before_allocating():
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'encoder.weight' has shape \[256, 64\]"):
        SAE.from_raw(_hp(d_sae=10**12), raw_tensors(64, 256, 0))
    raw = raw_tensors(64, 256, 0)
    raw["encoder.bias"] = raw["encoder.bias"].to(torch.int32)
    with pytest.raises(CorruptCheckpointError, match="'encoder.bias' has dtype torch.int32"):
        SAE.from_raw(_hp(), raw)
