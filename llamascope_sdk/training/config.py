"""TrainConfig: one SAE's training recipe, typed, validated and serialisable to YAML/JSON.

Defaults are spec section 4 "released" column (the replication script and the released
hyperparams.json). Where the paper disagrees, the paper's value is reachable through the same
fields; :func:`llamascope_sdk.training.recipes.paper_overrides` lists them, and the exported
card records which variant was used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llamascope_sdk.loading.registry import BASE_MODEL, D_MODEL
from llamascope_sdk.training.errors import TrainConfigError

Variant = Literal["released", "paper"]


class TrainConfig(BaseModel):
    """Everything needed to train one Top-K SAE or transcoder and export it as a release folder."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- what ------------------------------------------------------------------------
    name: str = Field(description="release name, e.g. L15R-8x, or any label for custom runs")
    model: str = Field(default=BASE_MODEL, description="HF id, folder or alias")
    hook_point_in: str = Field(description="TransformerLens hook name read as the SAE input")
    hook_point_out: str = Field(description="hook name of the target (same as in for SAEs)")
    d_model: int = Field(default=D_MODEL, gt=0)
    expansion_factor: int = Field(default=8, gt=0)
    top_k: int = Field(default=50, gt=0, description="final K of the Top-K activation")

    # --- data ------------------------------------------------------------------------
    dataset: str = Field(default="cerebras/SlimPajama-627B",
                         description="HF dataset name (streamed) or a local .txt/.jsonl/.parquet "
                                     "file; several local files may be joined with ','")
    dataset_split: str = "train"
    text_field: str = "text"
    holdout_fraction: float = Field(default=0.0, ge=0, lt=1, allow_inf_nan=False,
                                    description="tail of each local file kept out of training")
    context_size: int = Field(default=1024, gt=1, description="documents are truncated to this")
    split_long_documents: bool = Field(default=False,
                                       description="cut long documents into context-size rows "
                                                   "(each with BOS) instead of truncating; for "
                                                   "small corpora, not the recipe")
    store_batch_size: int = Field(default=32, gt=0, description="documents per LM forward")
    buffer_tokens: int = Field(default=500_000, ge=0,
                               description="shuffle buffer; refilled when half is consumed")
    activation_cache: str | None = Field(default=None,
                                         description="folder of cached activation shards to "
                                                     "train from instead of the model")
    epochs: int = Field(default=1, gt=0, description="passes over a cache (ignored when live)")

    # --- optimisation ------------------------------------------------------------------
    total_tokens: int = Field(default=800_000_000, gt=0)
    batch_size: int = Field(default=2048, gt=0, description="tokens per optimiser step (global)")
    lr: float = Field(default=8e-4, gt=0, allow_inf_nan=False, description="peak learning rate")
    betas: tuple[float, float] = Field(default=(0.9, 0.9999), description="paper: (0.9, 0.999)")
    eps: float = Field(default=1e-8, gt=0, allow_inf_nan=False)
    lr_warmup_steps: int | float = Field(default=5000, ge=0, allow_inf_nan=False,
                                         description="steps, or a fraction of steps if < 1; "
                                                     "paper: 10000")
    lr_cooldown_fraction: float = Field(default=0.2, ge=0, le=1, allow_inf_nan=False,
                                        description="linear decay over this final fraction")
    lr_end_ratio: float = Field(default=0.01, ge=0, le=1, allow_inf_nan=False, description="paper: 0.0")
    clip_grad_norm: float | None = Field(default=0.001, gt=0, allow_inf_nan=False, description="global norm; paper: none")
    k_warmup_fraction: float = Field(default=0.1, ge=0, le=1, allow_inf_nan=False,
                                     description="K anneals over this first fraction of steps")
    k_init_ratio: float = Field(default=0.5, gt=0, allow_inf_nan=False,
                                description="k_0 = ratio * d_model; released 0.5 (D/2), paper 1.0")
    init_decoder_norm: float = Field(default=0.5, gt=0, allow_inf_nan=False,
                                     description="released 0.5 for both widths; paper "
                                                 "sqrt(2/expansion) (0.25 for 32x)")
    init_encoder_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                             description="TC only (0.5)")
    norm_tokens: int = Field(default=16_384, gt=0, description="tokens for the dataset-wise norm")
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="SAE parameter dtype; the release used bfloat16 params")
    lm_dtype: Literal["float32", "bfloat16"] | None = Field(
        default=None, description="LM dtype; default bf16 on CUDA, fp32 on CPU")
    sparse_kernels: bool = Field(default=True, description="decoder touches only k rows")
    variant: Variant = Field(default="released", description="which column of spec 4")
    seed: int = Field(default=42, ge=0)

    # --- post-processing / export -------------------------------------------------------
    threshold_tokens: int = Field(default=32_768, gt=0, description="batch for the JumpReLU θ")
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"

    # --- run management ----------------------------------------------------------------
    output_dir: str = "runs"
    checkpoint_every: int = Field(default=10_000, gt=0, description="steps")
    keep_checkpoints: int = Field(default=2, gt=0)
    log_every: int = Field(default=100, gt=0)
    dead_window_tokens: int = Field(default=1_000_000, gt=0,
                                    description="a feature silent this long counts as dead")
    device: str = "cpu"
    wandb_project: str | None = None
    ddp_data: Literal["shard", "replicate"] = Field(
        default="shard", description="shard: each rank generates its own documents (scale-out); "
                                     "replicate: every rank reads the same stream and keeps its "
                                     "slice of each global batch (exact 1-process equivalence)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(b) and 0 <= b < 1 for b in v):
            raise ValueError(f"betas must be two numbers in [0, 1), got {list(v)}")
        return v

    @field_validator("name", "model", "hook_point_in", "hook_point_out", "dataset", "output_dir",
                     "device")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if isinstance(self.lr_warmup_steps, float) and self.lr_warmup_steps >= 1 and (
                not self.lr_warmup_steps.is_integer()):
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps}: give a whole number of "
                             "steps, or a fraction of the steps below 1")
        if self.buffer_tokens and self.buffer_tokens < self.batch_size:
            raise ValueError(f"buffer_tokens={self.buffer_tokens} is smaller than one batch "
                             f"(batch_size={self.batch_size}); use 0 to disable shuffling")
        if self.top_k > self.d_sae:
            raise ValueError(f"top_k={self.top_k} exceeds d_sae={self.d_sae} "
                             "(d_model * expansion_factor)")
        if self.is_transcoder and self.init_encoder_norm is None:
            raise ValueError("init_encoder_norm is required for a transcoder "
                             "(hook_point_in != hook_point_out)")
        if self.total_steps < 1:
            raise ValueError(f"total_tokens={self.total_tokens} is less than one batch "
                             f"(batch_size={self.batch_size})")
        return self

    @property
    def d_sae(self) -> int:
        return self.d_model * self.expansion_factor

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_in != self.hook_point_out

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def warmup_steps(self) -> int:
        w = self.lr_warmup_steps
        return int(round(w * self.total_steps)) if isinstance(w, float) and w < 1 else int(w)

    @property
    def k_warmup_steps(self) -> int:
        return int(self.k_warmup_fraction * self.total_steps)

    @property
    def k_init(self) -> int:
        return min(self.d_sae, max(self.top_k, math.ceil(self.k_init_ratio * self.d_model)))

    def data_key(self) -> tuple[Any, ...]:
        """Fields that must agree for SAEs that share one LM pass and one buffer."""
        return (self.model, self.dataset, self.dataset_split, self.text_field, self.context_size, self.split_long_documents,
                self.store_batch_size, self.buffer_tokens, self.activation_cache,
                self.batch_size, self.total_tokens, self.seed, self.holdout_fraction,
                self.epochs, self.ddp_data, self.device, self.lm_dtype)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        import yaml  # pyyaml, the train extra: imported where YAML is read or written

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        text = self.to_yaml() if path.suffix in {".yaml", ".yml"} else (
            json.dumps(self.to_dict(), indent=2) + "\n")
        path.write_text(text, encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a recipe from ``.yaml``/``.yml`` or ``.json``.

        Raises:
            TrainConfigError: the file is missing, is not valid YAML/JSON, or holds invalid
                values (the message names each field).
        """
        import yaml  # pyyaml, the train extra: imported where YAML is read or written

        path = Path(path)
        hint = "see `python training/run.py --sae L15R-8x --print-config` for a valid recipe"
        if not path.is_file():
            raise TrainConfigError(f"recipe file {path} does not exist", hint=hint)
        try:
            text = path.read_text(encoding="utf-8")
            data = (yaml.safe_load(text) if path.suffix in {".yaml", ".yml"} else json.loads(text))
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainConfigError(f"{path} is not a readable YAML/JSON recipe: {first}",
                                   hint=hint) from None
        if not isinstance(data, dict):
            raise TrainConfigError(f"{path} holds a {type(data).__name__}, not a mapping of "
                                   "TrainConfig fields", hint=hint)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise TrainConfigError(f"invalid recipe {path}: {describe(exc)}", hint=hint) from None

    def with_overrides(self, pairs: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings; values are parsed as YAML (numbers, lists, null)."""
        import yaml  # pyyaml, the train extra: imported where YAML is read or written

        data = self.to_dict()
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            key = key.strip()
            if not sep or key not in type(self).model_fields:
                valid = ", ".join(sorted(type(self).model_fields)[:8])
                raise TrainConfigError(f"bad override {pair!r}: expected key=value with key one of "
                                       f"the TrainConfig fields ({valid}, ...)",
                                       hint="--print-config shows every field and its value")
            try:
                data[key] = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise TrainConfigError(f"bad override {pair!r}: the value is not valid YAML") from None
        try:
            return type(self).model_validate(data)
        except ValidationError as exc:
            raise TrainConfigError(f"invalid value after --set: {describe(exc)}",
                                   hint="fix the --set KEY=VALUE pair") from None


def describe(exc: ValidationError) -> str:
    """A pydantic error as one line naming each field: ``lr: Input should be ... (got inf)``."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        got = e.get("input")
        shown = f" (got {got!r})" if loc and not isinstance(got, dict) and "got" not in msg else ""
        parts.append(f"{loc}: {msg}{shown}" if loc else msg)
    return "; ".join(parts)
