"""The ``hyperparams.json`` schema of a Llama Scope release folder.

Field names and meanings follow the released files (spec section 2.1). Fields the SDK does not
use are kept verbatim (``extra="allow"``) so that ``save_pretrained`` writes back every field.
Validation errors name the offending field. Integer fields are strict (JSON ints only: ``true``
or ``4096.0`` are refused, not coerced), and every float the math uses must be finite.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictInt,
    ValidationError,
    model_validator,
)

from llamascope_sdk.base.errors import HyperparamsError


class DatasetNorm(BaseModel):
    """Mean L2 norm of the raw activations at the SAE's input and output hook points."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    in_: float = Field(alias="in", gt=0, allow_inf_nan=False, description="mean ||x|| at hook_point_in")
    out: float = Field(gt=0, allow_inf_nan=False, description="mean ||y|| at hook_point_out")


class Hyperparams(BaseModel):
    """Parsed hyperparams.json. Only the fields the math needs are required."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    d_model: StrictInt = Field(gt=0)
    d_sae: StrictInt = Field(gt=0)
    hook_point_in: str
    hook_point_out: str
    act_fn: Literal["jumprelu", "topk", "relu"] = Field(
        description="jumprelu for every release; topk/relu for runs before post-processing")
    jump_relu_threshold: float = Field(
        default=0.0, ge=0, allow_inf_nan=False, description="global threshold in the folded space (spec 3.2)")
    norm_activation: Literal["dataset-wise", "inference"] = Field(
        description="dataset-wise: inputs/outputs are rescaled by sqrt(d_model)/norm")
    dataset_average_activation_norm: DatasetNorm | None = None
    top_k: StrictInt = Field(default=50, gt=0, description="training K; unused at inference")
    sparsity_include_decoder_norm: bool = True
    use_decoder_bias: bool = True
    apply_decoder_bias_to_pre_encoder: bool = False
    expansion_factor: StrictInt | None = None
    dtype: str = "torch.bfloat16"
    #: The JSON object this was parsed from, kept so that saving writes back the original key
    #: set, order and spelling; only values that changed are replaced (see to_json_dict).
    _raw: dict[str, Any] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _check(self) -> Hyperparams:
        if self.norm_activation == "dataset-wise" and self.dataset_average_activation_norm is None:
            raise ValueError("dataset_average_activation_norm is required when norm_activation "
                             "is 'dataset-wise'")
        if self.apply_decoder_bias_to_pre_encoder:
            raise ValueError("apply_decoder_bias_to_pre_encoder=true is used by no Llama Scope "
                             "release and is not supported")
        if self.top_k > self.d_sae:
            raise ValueError(f"top_k={self.top_k} is larger than d_sae={self.d_sae}; allowed "
                             f"are 1..{self.d_sae}")
        if not math.isfinite(self.jump_relu_threshold):  # also for instances built unvalidated
            raise ValueError("jump_relu_threshold must be a finite number >= 0")
        return self

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_in != self.hook_point_out

    @property
    def scale_in(self) -> float:
        """s_in = sqrt(d_model) / n_in: the factor that maps raw inputs to training space."""
        if self.dataset_average_activation_norm is None or self.norm_activation == "inference":
            return 1.0
        return math.sqrt(self.d_model) / self.dataset_average_activation_norm.in_

    @property
    def scale_out(self) -> float:
        """s_out = sqrt(d_model) / n_out: the factor that maps raw outputs to training space."""
        if self.dataset_average_activation_norm is None or self.norm_activation == "inference":
            return 1.0
        return math.sqrt(self.d_model) / self.dataset_average_activation_norm.out

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON object to write. For hyperparams read from a file this is that file's
        object with the same keys in the same order; a value is replaced only when it differs
        (``0`` and ``0.0`` are the same value), and fields set after reading are appended."""
        if self._raw is None:
            return self.model_dump(mode="json", by_alias=True)
        dumped = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        out = copy.deepcopy(self._raw)
        for key, value in dumped.items():
            if key not in out or not _same_json(out[key], value):
                out[key] = value
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> Hyperparams:
        """Read and validate a hyperparams.json.

        Raises:
            HyperparamsError: unreadable JSON, a missing field or a field of the wrong type;
                the message names the field.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HyperparamsError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: Any, source: str = "hyperparams") -> Hyperparams:
        if not isinstance(raw, dict):
            raise HyperparamsError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        try:
            hp = cls.model_validate(raw)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                msg = err["msg"].removeprefix("Value error, ")
                if not err["loc"]:  # a cross-field check: its message names the fields
                    problems.append(msg)
                    continue
                field = ".".join(str(p) for p in err["loc"])
                got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
                problems.append(f"field '{field}': {msg}{got}")
            raise HyperparamsError(f"{source} is invalid: " + "; ".join(problems)) from None
        hp._raw = copy.deepcopy(raw)
        return hp


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: numbers by value (1 == 1.0, but not True == 1), objects and
    arrays element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
