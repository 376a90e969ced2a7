"""Dtype names: the one table that maps user spellings and safetensors headers to torch dtypes."""

from __future__ import annotations

import torch

#: User spellings (``--dtype``, ``dtype=``, hyperparams.json) -> torch dtype.
NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64,
}
#: safetensors header dtype -> torch dtype, for the floating-point types a checkpoint may hold.
SAFETENSORS: dict[str, torch.dtype] = {"BF16": torch.bfloat16, "F16": torch.float16,
                                       "F32": torch.float32, "F64": torch.float64}


def parse_dtype(dtype: torch.dtype | str | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """``"bf16"``, ``"torch.bfloat16"``, ``torch.bfloat16`` ... -> ``torch.bfloat16``.

    Raises:
        ValueError: an unknown name; the message lists the allowed ones.
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype not in NAMES.values():
            raise ValueError(f"dtype {dtype} is not supported: allowed are {', '.join(sorted(NAMES))}")
        return dtype
    key = str(dtype).removeprefix("torch.").lower()
    if key not in NAMES:
        raise ValueError(f"unknown dtype {dtype!r}: allowed are {', '.join(sorted(NAMES))}")
    return NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling hyperparams.json uses)."""
    return str(dtype).removeprefix("torch.")
