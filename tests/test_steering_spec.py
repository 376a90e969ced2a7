"""The steering spec: one mode table and one entry definition (parse, emit, schema, build) that
serve, eval-steer, the lm-eval export and the CLI all read; and the readout percentiles."""

from __future__ import annotations

import math

import pytest
import torch

from llamascope_sdk import Ablate, Clamp, Scale, Steer
from llamascope_sdk.base.errors import FieldError, InputError
from llamascope_sdk.steering import spec
from llamascope_sdk.steering.spec import MODES, ReadoutEntry, SteeringEntry, parse_steering
from llamascope_sdk.store.percentile import percentiles
from tests.helpers import tiny_sae

ENTRIES = [
    {"sae": "demo", "feature": 4154, "mode": "add", "value": 40.0, "relative": False,
     "positions": "generated"},
    {"sae": "L12R-8x", "feature": [1, 2], "mode": "clamp", "value": [3.0, 4.5], "positions": "all"},
    {"sae": "demo", "feature": 7, "mode": "scale", "value": 0.5, "positions": "prompt"},
    {"sae": "demo", "feature": 7, "mode": "ablate", "mean": True, "positions": "all"},
    {"sae": "demo", "feature": 7, "mode": "add", "value": 2.0, "relative": True, "positions": "all",
     "when": {"sae": "demo", "feature": 1297, "above": 2.5, "latch": True}},
    {"sae": "demo", "feature": 7, "mode": "add", "value": 2.0, "relative": False, "positions": "all",
     "when": {"direction": [1.0, 0.0, -2.0], "hook_point": "blocks.3.hook_resid_post",
              "above": 0.0}},
]


@pytest.mark.parametrize("raw", ENTRIES)
def test_parse_and_emit_round_trip(raw) -> None:
    entry = SteeringEntry.parse(raw)
    assert entry.to_json() == raw
    assert SteeringEntry.parse(entry.to_json()) == entry


def _validate(schema: dict, value) -> bool:
    """A small validator for the subset of JSON schema the entry schema uses, written here."""
    if "oneOf" in schema and sum(_validate(s, value) for s in schema["oneOf"]) != 1:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool}
    if t == "integer" and (isinstance(value, bool) or not isinstance(value, int)):
        return False
    if t == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return False
    if t in types and not isinstance(value, types[t]):
        return False
    if "minimum" in schema and value < schema["minimum"]:
        return False
    if "minLength" in schema and len(value) < schema["minLength"]:
        return False
    if t == "array":
        if len(value) < schema.get("minItems", 0):
            return False
        if not all(_validate(schema.get("items", {}), v) for v in value):
            return False
    if isinstance(value, dict):
        if any(k not in value for k in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and any(k not in props for k in value):
            return False
        if not all(_validate(props[k], v) for k, v in value.items() if k in props):
            return False
    for rule in schema.get("allOf", []):
        branch = rule["then"] if _validate(rule["if"], value) else rule["else"]
        if not _validate(branch, value):
            return False
    return not ("not" in schema and _validate(schema["not"], value))


BAD = [
    ({"sae": "demo", "feature": 1, "mode": "boost", "value": 1.0}, "steering[0].mode"),
    ({"sae": "demo", "feature": 1, "mode": "add"}, "steering[0].value"),
    ({"sae": "demo", "feature": 1, "mode": "ablate", "value": 1.0}, "steering[0].value"),
    ({"sae": "demo", "feature": 1.5, "value": 1.0}, "steering[0].feature"),
    ({"sae": "demo", "feature": 1, "value": 1.0, "colour": "red"}, "steering[0].colour"),
    ({"sae": "", "feature": 1, "value": 1.0}, "steering[0].sae"),
    ({"sae": "demo", "feature": 1, "value": 1.0, "when": {"sae": "demo", "feature": 2}},
     "steering[0].when.above"),
    ({"sae": "demo", "feature": 1, "value": 1.0,
      "when": {"direction": [], "hook_point": "blocks.1.hook_resid_post", "above": 1}},
     "steering[0].when.direction"),
]


@pytest.mark.parametrize("raw", ENTRIES)
def test_the_schema_accepts_every_entry_the_parser_accepts(raw) -> None:
    assert _validate(spec.entry_schema(), raw)


@pytest.mark.parametrize("raw,field", BAD)
def test_bad_entries_name_their_field_and_the_schema_refuses_them(raw, field) -> None:
    with pytest.raises(FieldError) as info:
        parse_steering([raw], max_edits=4)
    assert info.value.field == field and isinstance(info.value, (InputError, ValueError))
    assert "\n" not in str(info.value)
    if field != "steering[0].when.direction":  # minItems of a nested array: same verdict
        assert not _validate(spec.entry_schema(), raw)


def test_every_mode_builds_its_intervention_and_back() -> None:
    sae = tiny_sae()
    made = {}
    for name, mode in MODES.items():
        raw = {"sae": "x", "feature": [3, 4], "mode": name, "positions": "prompt"}
        if mode.value_arg is not None:
            raw["value"] = 2.0
        entry = SteeringEntry.parse(raw)
        iv = entry.intervention(sae)
        assert type(iv) is mode.intervention
        made[name] = type(iv)
        assert SteeringEntry.of(iv, "x") == SteeringEntry.parse(raw)
    assert made == {"add": Steer, "clamp": Clamp, "scale": Scale, "ablate": Ablate}
    assert spec.SWEEP_MODES == ("add", "clamp", "scale")
    assert [m.name for m in MODES.values() if m.lm_eval_action] == ["add"]


def test_readout_entries() -> None:
    assert spec.parse_readout({"sae": "demo", "features": [1, 2]}) == [
        ReadoutEntry("demo", features=(1, 2))]
    assert spec.parse_readout([{"sae": "demo", "top_k": 3}]) == [ReadoutEntry("demo", top_k=3)]
    for bad, field in (({"sae": "demo"}, "readout"), ({"sae": "demo", "top_k": 0}, "readout.top_k"),
                       ({"sae": "demo", "features": [1], "top_k": 2}, "readout"),
                       ([], "readout")):
        with pytest.raises(FieldError) as info:
            spec.parse_readout(bad)
        assert info.value.field == field


def test_percentiles_agree_with_the_samples_within_their_bin() -> None:
    """Percentiles read off the mined histogram, against the exact percentile of the samples
    the histogram was made of: they differ by at most the share of samples in the value's bin."""
    edges = torch.logspace(-3, 4, 57, dtype=torch.float64).float()
    g = torch.Generator().manual_seed(0)
    samples = [torch.exp(torch.randn(5000, generator=g) * 1.5 + 0.5),
               torch.rand(300, generator=g) * 40 + 1e-4]
    counts = torch.stack([torch.bincount(torch.bucketize(s, edges), minlength=58) for s in samples])
    queries = torch.tensor([[0.0, 0.5, 1.0, 3.0, 30.0], [0.0, 0.01, 5.0, 20.0, 39.0]])
    got = percentiles(counts, edges, torch.tensor([[0], [1]]), queries)
    for f, s in enumerate(samples):
        for j, v in enumerate(queries[f].tolist()):
            exact = 100 * float((s < v).double().mean())
            b = int(torch.bucketize(torch.tensor(v), edges))
            share = 100 * float(counts[f, b]) / len(s)
            assert abs(float(got[f, j]) - exact) <= share + 1e-4, (f, v)
            if v == 0:
                assert float(got[f, j]) == 0.0
    none = percentiles(torch.zeros(1, 58, dtype=torch.long), edges, torch.tensor([0]),
                       torch.tensor([1.0]))
    assert math.isnan(float(none[0]))
