"""Loading the language model an SAE hooks into, and tokenising text the way the recipe does.

``load_model("smollm2-135m")`` loads the offline demo model, SmolLM2-135M-Instruct, from its
converted copy (:mod:`llamascope_sdk.loading.model_cache`), checked against the GGUF file at every load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.devices import resolve_device
from llamascope_sdk.base.dtypes import parse_dtype
from llamascope_sdk.base.errors import (
    HubUnreachableError,
    IncompatibleModelError,
    InputError,
    ModelNotFoundError,
)
from llamascope_sdk.corpus import encode, pad_id, pad_rows
from llamascope_sdk.loading import model_cache
from llamascope_sdk.loading.hub import check_reachable
from llamascope_sdk.loading.hub_errors import translate
from llamascope_sdk.loading.model_cache import converted_smollm2, is_smollm2
from llamascope_sdk.loading.registry import BASE_MODEL

DEFAULT_MODEL = BASE_MODEL


def resolve_model_path(name_or_path: str) -> str:
    """Map an alias to a local folder or Hub id (converting the demo GGUF model on first use)."""
    return str(converted_smollm2()) if is_smollm2(name_or_path) else name_or_path


def check_hidden_size(name_or_path: str, path: str, hidden_size: int, *,
                      revision: str | None = None, token: str | bool | None = None) -> None:
    """Refuse a model whose hidden size is not ``hidden_size``, reading only its config
    (config.json: a few hundred bytes from the Hub, never the weights).

    Raises:
        IncompatibleModelError: the message names both widths.
    """
    if is_smollm2(name_or_path):
        width = model_cache.hidden_size(Path(path))
    else:
        from transformers import AutoConfig

        if not Path(path).is_dir():

            check_reachable(path, "config.json", revision=revision, token=token)
        width = getattr(AutoConfig.from_pretrained(path, revision=revision, token=token),
                        "hidden_size", None)
    if width is not None and int(width) != hidden_size:
        raise IncompatibleModelError(
            f"model {name_or_path!r}: the SAE's d_model={hidden_size} does not match the model's "
            f"hidden_size={width} (read from its config, before any weights)",
            hint="pass --model (model=) with the model the SAE was trained on")


def load_model(name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, revision: str | None = None,
               token: str | bool | None = None, hidden_size: int | None = None) -> tuple[Any, Any]:
    """Load a Llama-family causal LM and its tokenizer.

    Args:
        name_or_path: a Hub id, a local folder, or ``"smollm2-135m"`` for the offline demo
            model (converted once and checked against its GGUF file at every load, see
            :mod:`llamascope_sdk.loading.model_cache`).
        hidden_size: refuse a model of another width before its weights are downloaded
            (an SAE's ``d_model``).
        device: where to put it (default CPU).
        dtype: weights dtype; default fp32 on CPU and bf16 on CUDA.
        revision, token: passed to transformers for Hub models.

    Returns:
        (model in eval mode, tokenizer).

    Raises:
        HubAccessError: the model is gated or private and the token may not read it.
        ModelNotFoundError: neither a local folder nor a repository (or revision) on the Hub.
        IncompatibleModelError: the model's hidden size is not ``hidden_size``.
        CorruptCheckpointError: the converted SmolLM2 is not what its GGUF file says.
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

            check_reachable(path, "config.json", revision=revision, token=token)
        if hidden_size is not None:
            check_hidden_size(name_or_path, path, hidden_size, revision=revision, token=token)
        tok = AutoTokenizer.from_pretrained(path, revision=revision, token=token)
        model = AutoModelForCausalLM.from_pretrained(path, revision=revision, token=token, dtype=dt)
    except HubUnreachableError as exc:
        raise HubUnreachableError(f"could not load model {name_or_path!r}: {exc}",
                                  hint=f"{exc.hint}; or use --model smollm2-135m (the offline "
                                       "demo model)") from None
    except OSError as exc:
        raise _load_error(name_or_path, revision, exc) from None
    if is_smollm2(name_or_path):
        model_cache.check_loaded(model, Path(path))
    model.eval().to(dev)
    return model, tok


def _load_error(name: str, revision: str | None, exc: OSError) -> Exception:
    """The llamascope error for a failed ``from_pretrained`` (transformers wraps every Hub
    error in OSError): :func:`~llamascope_sdk.loading.hub_errors.translate`, worded for a model."""

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
