"""The served model's tokenizer over HTTP: ``GET /tokenizer_info``, ``POST /tokenize``,
``POST /detokenize``, in the shapes vLLM's server answers them.

lm-eval's ``local-completions`` looks for these two endpoints (``tokenizer_info`` with an
``eos_token``, ``tokenize`` returning ``tokens``) and, when both answer, tokenises through the
server (its ``remote`` tokenizer backend): then it needs no local copy of the tokenizer and
cannot pick a different one. ``/tokenize`` takes ``{"prompt": TEXT, "add_special_tokens": BOOL}``
(default true, as vLLM) and tokenises exactly as the tokenizer does; note that a completion's
text ``prompt`` gets the SDK's one BOS first (:func:`~llamascope_sdk.loading.models.tokenize`),
which for SmolLM2 is what ``add_special_tokens`` does not add.
"""

from __future__ import annotations

from typing import Any

from llamascope_sdk.serve.errors import HttpError


def tokenizer_info(tokenizer: Any, model_id: str, max_model_len: int | None) -> dict[str, Any]:
    """What lm-eval's remote tokenizer reads (the special tokens and the chat template), and
    ``name_or_path``: the folder to give lm-eval as ``tokenizer=`` for a local copy."""
    def tok(name: str) -> str | None:
        v = getattr(tokenizer, name, None)
        return str(v) if v is not None else None

    return {"model": model_id, "tokenizer_class": type(tokenizer).__name__,
            "name_or_path": getattr(tokenizer, "name_or_path", None),
            "eos_token": tok("eos_token"), "bos_token": tok("bos_token"),
            "pad_token": tok("pad_token"), "unk_token": tok("unk_token"),
            "chat_template": getattr(tokenizer, "chat_template", None) or None,
            "vocab_size": len(tokenizer), "max_model_len": max_model_len}


def tokenize(tokenizer: Any, body: dict[str, Any], max_model_len: int | None) -> dict[str, Any]:
    """``{"prompt": TEXT, "add_special_tokens": true}`` -> ``{"tokens", "count", "max_model_len"}``."""
    text = body.get("prompt")
    if not isinstance(text, str):
        raise HttpError(400, f"prompt must be a string, got {type(text).__name__}", "prompt")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise HttpError(400, f"add_special_tokens must be true or false, got {special!r}",
                        "add_special_tokens")
    ids = [int(i) for i in tokenizer(text, add_special_tokens=special)["input_ids"]]
    return {"tokens": ids, "count": len(ids), "max_model_len": max_model_len}


def detokenize(tokenizer: Any, body: dict[str, Any]) -> dict[str, Any]:
    """``{"tokens": [ids]}`` -> ``{"prompt": TEXT}`` (special tokens kept, as vLLM)."""
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        raise HttpError(400, "tokens must be a list of token ids", "tokens")
    vocab = len(tokenizer)
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise HttpError(400, f"tokens: token id {bad[0]} is out of range; allowed are "
                             f"0..{vocab - 1}", "tokens")
    return {"prompt": str(tokenizer.decode(ids))}


__all__ = ["detokenize", "tokenize", "tokenizer_info"]
