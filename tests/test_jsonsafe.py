"""Results JSON never carries NaN or inf (which strict JSON readers reject)."""

import json
import math

from llamascope_sdk.base.jsonsafe import json_safe


def test_non_finite_floats_become_null_at_any_depth() -> None:
    value = {"a": math.nan, 2: [1.5, math.inf, (-math.inf, 3)], "b": {"c": [math.nan]}, "d": "x"}
    out = json_safe(value)
    assert out == {"a": None, "2": [1.5, None, [None, 3]], "b": {"c": [None]}, "d": "x"}
    json.dumps(out, allow_nan=False)  # raises on any NaN/inf left


def test_finite_values_pass_unchanged() -> None:
    value = {"x": [0.0, -1e300, 5, True, None, "nan"]}
    assert json_safe(value) == value
