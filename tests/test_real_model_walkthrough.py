"""The README's "real model" section, run here with the same code path: a Llama Scope name
resolved and downloaded through the (fake) Hub, steering with --chat, mining the statistics
that --relative needs, and the memory table's formula. Only the model differs (SmolLM2-135M
on CPU instead of Llama-3.1-8B on a GPU), so the SAE served has SmolLM2's width."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk import SAE, FeatureStats, Hyperparams, Steer, compare_generations
from llamascope_sdk.cli import app

from .fakehub import fake_hub_fixture, release_files  # noqa: F401  (fixture)
from .helpers import raw_tensors, release_hyperparams

runner = CliRunner()
REPO, FOLDER = "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x", "Llama3_1-8B-Base-L15R-8x"


@pytest.fixture
def served(fake_hub) -> dict:
    """L15R-8x on the fake Hub, 576 wide (SmolLM2's hidden size) with 1,152 features."""
    hp = release_hyperparams(layer=15, position="R", d_model=576, d_sae=1152, threshold=0.3,
                             norm_in=168.0)
    fake_hub.hub.commit(REPO, release_files(FOLDER, hp, raw_tensors(576, 1152, seed=3)))
    return hp


def _steer(*extra: str) -> dict:
    res = runner.invoke(app, ["steer", "--sae", "L15R-8x", "-f", "3", "-a", "8", "--device", "cpu",
                              "--model", "smollm2-135m", "-n", "4", "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.smollm
def test_steer_and_chat_by_llama_scope_name(served, smollm2) -> None:
    out = _steer("--prompt", "The city of")
    assert out["sae"] == "L15R-8x" and len(out["steered_ids"]) == 4
    assert f"({8 / 168.0:.2f} x the site's mean norm 168)" in out["description"]
    chat = _steer("--chat", "--prompt", "Describe a city.")
    assert chat["chat"] is True and "positions=generated" in chat["description"]


@pytest.mark.smollm
def test_mined_statistics_make_relative_steering_work(served, smollm2, tmp_path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"The city of {c} has a river, a market and an old church."
                                for c in ("Rome", "Paris", "Lyon", "Turin", "Bern", "Oslo")))
    store = tmp_path / "stores" / "L15R-8x"
    res = runner.invoke(app, ["inspect", "--sae", "L15R-8x", "--model", "smollm2-135m",
                              "--dataset", str(text), "--tokens", "200", "--out", str(store),
                              "--no-pages"])
    assert res.exit_code == 0, res.output
    sae = SAE.from_pretrained("L15R-8x")
    assert sae.stats is None  # the releases ship no statistics
    sae.stats = FeatureStats.load(store)
    feature = int(sae.stats.typical.argmax())
    model, tok = smollm2
    rel = compare_generations(model, tok, "The city of", [Steer(sae, [feature], 2.0, relative=True)],
                              max_new_tokens=4)
    raw = compare_generations(model, tok, "The city of",
                              [Steer(sae, [feature], 2.0 * float(sae.stats.typical[feature]))],
                              max_new_tokens=4)
    assert rel.steered_ids == raw.steered_ids


@pytest.mark.parametrize(("d_sae", "dtype", "gb"), [(32768, torch.bfloat16, 0.54),
                                                      (32768, torch.float32, 1.07),
                                                      (131072, torch.bfloat16, 2.15),
                                                      (131072, torch.float32, 4.30)])
def test_memory_table_is_the_shapes(d_sae: int, dtype: torch.dtype, gb: float) -> None:
    """The README's SAE sizes: 2·F·D weights + biases in the load dtype, an fp32 norm vector."""
    d = 4096
    formula = (2 * d_sae * d + d_sae + d) * torch.finfo(dtype).bits // 8 + 4 * d_sae + 4
    assert round(formula / 1e9, 2) == gb
    hp = release_hyperparams(d_model=64, d_sae=256)
    small = SAE(Hyperparams.from_dict(hp), dtype=dtype)
    held = sum(t.numel() * t.element_size() for t in small.state_dict().values())
    f, dm = 256, 64
    itemsize = torch.finfo(dtype).bits // 8
    assert held == (2 * f * dm + f + dm) * itemsize + 4 * f + itemsize  # + the scalar threshold
