"""The release folder layout: reading its header, writing it atomically.

A Llama Scope release folder holds::

    hyperparams.json
    lm_config.json
    checkpoints/final.safetensors   # encoder.weight [F,D], encoder.bias [F],
                                    # decoder.weight [D,F], decoder.bias [D]; training space

and, when the SDK wrote it, possibly README.md (the card), feature_stats.safetensors,
feature_labels.json and recipe.yaml (a trained SAE's recipe). The tensors are the *raw
training-space* parameters (spec 2.3); folding happens at load.

A folder is written whole, in one atomic step, with its statistics and labels inside that
step (:func:`~llamascope_sdk.base.atomic.write_folder`): saving SAE B over a folder that held SAE A
leaves nothing of A, and a folder holding anything but an SAE folder the SDK wrote is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import CorruptCheckpointError, SaeNotFoundError
from llamascope_sdk.core.feature_stats import LABELS_FILE, STATS_FILE
from llamascope_sdk.core.hyperparams import Hyperparams

HYPERPARAMS = "hyperparams.json"
LM_CONFIG = "lm_config.json"
CHECKPOINT = "checkpoints/final.safetensors"
CARD = "README.md"
RECIPE = "recipe.yaml"
#: Files a release folder may hold besides RELEASE_FILES (all written by write_release).
RELEASE_OPTIONAL = (CARD, STATS_FILE, LABELS_FILE, RECIPE)
#: Optional extra tensor [F] of a checkpoint: a per-feature JumpReLU threshold in the folded
#: space, written by llamascope-sdk for imported SAEs whose gate is not one scalar. Releases
#: never have it; when present it replaces hyperparams.json's jump_relu_threshold.
PER_FEATURE_THRESHOLD = "threshold"
RELEASE_FILES = (HYPERPARAMS, LM_CONFIG, CHECKPOINT)
TENSOR_NAMES = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
FORMAT_VERSION = "llamascope-release-v1"
#: safetensors dtype names the loader accepts.
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")


def expected_shapes(hp: Hyperparams) -> dict[str, tuple[int, ...]]:
    f, d = hp.d_sae, hp.d_model
    shapes = {"encoder.weight": (f, d), "encoder.bias": (f,), "decoder.weight": (d, f), "decoder.bias": (d,)}
    if not hp.use_decoder_bias:
        del shapes["decoder.bias"]
    return shapes


def check_folder(folder: Path) -> None:
    """Raise a clear error if ``folder`` is not a complete release folder."""
    if not folder.is_dir():
        raise SaeNotFoundError(f"{folder} is not a directory")
    missing = [f for f in (HYPERPARAMS, CHECKPOINT) if not (folder / f).is_file()]
    if missing:
        raise SaeNotFoundError(
            f"{folder} is not a Llama Scope release folder: missing {', '.join(missing)} "
            f"(expected {', '.join(RELEASE_FILES)})")


def open_checkpoint(path: Path, hp: Hyperparams, device: str = "cpu") -> Any:
    """Open the safetensors file and validate its keys and shapes before any data is read.

    Returns an open ``safe_open`` handle; the caller closes it (it is a context manager).
    """
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError types
        raise CorruptCheckpointError(
            f"{path} is not a readable safetensors file ({exc}); it is probably truncated or "
            "corrupt", hint="delete it, or load again with force_download=True") from None
    want = expected_shapes(hp)
    keys = set(handle.keys())
    missing = sorted(set(want) - keys)
    unexpected = sorted(keys - set(TENSOR_NAMES) - {PER_FEATURE_THRESHOLD})
    if missing or unexpected:
        raise CorruptCheckpointError(
            f"{path}: tensor names do not match the release layout: missing {missing}, "
            f"unexpected {unexpected}; expected {list(want)}")
    if PER_FEATURE_THRESHOLD in keys:
        want = {**want, PER_FEATURE_THRESHOLD: (hp.d_sae,)}
    for name, shape in want.items():
        sl = handle.get_slice(name)
        got = tuple(sl.get_shape())
        if got != shape:
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' has shape {list(got)}, but hyperparams.json "
                f"(d_model={hp.d_model}, d_sae={hp.d_sae}) requires {list(shape)}")
        if sl.get_dtype() not in FLOAT_DTYPES:
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' has dtype {sl.get_dtype()}; a release checkpoint holds "
                f"floating-point tensors ({', '.join(FLOAT_DTYPES)}; the releases use BF16)")
    return handle


def read_lm_config(folder: Path) -> dict[str, Any] | None:
    """The folder's lm_config.json as a dict, or None when there is none.

    Raises:
        CorruptCheckpointError: the file is not a JSON object with a string ``model_name``.
    """
    path = folder / LM_CONFIG
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_name"), str):
        raise CorruptCheckpointError(f"{path}: expected a JSON object with a string 'model_name'")
    return cfg


def default_lm_config(model_name: str, d_model: int) -> dict[str, Any]:
    return {"model_name": model_name, "use_flash_attn": False, "cache_dir": None,
            "d_model": d_model, "local_files_only": False}
