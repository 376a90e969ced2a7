"""Model cards: all 256 release cards and a custom-SAE card render and parse with huggingface_hub."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from llamascope_sdk.loading.cards import render_all, render_card
from llamascope_sdk.loading.demo import DEMO_SAE_DIR
from llamascope_sdk.loading.registry import ALL_SAES, resolve

REPO = Path(__file__).resolve().parents[1]
SNIPPET = re.compile(r'SAE\.from_pretrained\("([^"]+)"\)')


def _tables_are_well_formed(text: str) -> None:
    """Every row of a markdown table has as many cells as its header (no stray '|')."""
    lines, i = text.splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            width = lines[i].count("|")
            while i < len(lines) and lines[i].startswith("|"):
                assert lines[i].count("|") == width, lines[i]
                i += 1
        i += 1


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("cards")
    metrics = {"L15R-8x": {"l0_mean": 50.2, "explained_variance_centred": 0.7,
                           "explained_variance_uncentred": 0.85, "mse": 0.008,
                           "delta_lm_loss": 0.16, "kl_div": 0.15, "frac_dead": 0.1,
                           "frac_dense": 0.01, "n_tokens": 50000, "context": 1024}}
    paths = render_all(out, metrics)
    assert len(paths) == 257 and paths[-1].parent.name == "demo"
    return {p.parent.name: p.read_text(encoding="utf-8") for p in paths}


def test_every_release_card_parses_and_has_its_facts(rendered: dict[str, str]) -> None:
    for ref in ALL_SAES:
        text = rendered[ref.name]
        data = ModelCard(text).data
        assert data.library_name == "llamascope-sdk"
        assert data.base_model == "meta-llama/Llama-3.1-8B"
        assert data.datasets == ["cerebras/SlimPajama-627B"]
        assert data.license == "apache-2.0"
        assert "sparse-autoencoder" in data.tags and f"layer-{ref.layer}" in data.tags
        (name,) = SNIPPET.findall(text)
        assert resolve(name) == ref
        assert f"`{ref.hook_point_in}`" in text and f"`{ref.hook_point_out}`" in text
        assert ref.hf_out in text
        assert f"https://huggingface.co/{ref.repo_id()}/tree/main/{ref.subfolder()}" in text
        assert "JumpReLU" in text and "||d_i|| h_i / s_out > theta" in text
        assert "(differs)" in text and "K = 50" in text
        if ref.position == "TC":
            assert "neuronpedia.org" not in text and "no Llama Scope transcoders" in text
            assert "transcoder" in data.tags
        else:
            assert f"({ref.neuronpedia_url})" in text
        assert ("Not recommended" in text) == (ref.position == "A")
        assert ("1.6B tokens" in text) == (ref.expansion == 32)
        _tables_are_well_formed(text)


def test_snippet_uses_paper_width_names(rendered: dict[str, str]) -> None:
    assert 'SAE.from_pretrained("L12M-128k")' in rendered["L12M-32x"]
    assert 'SAE.from_pretrained("L12M-32k")' in rendered["L12M-8x"]


def test_metrics_appear_where_present(rendered: dict[str, str]) -> None:
    assert "| delta LM loss (nats; spliced CE - clean CE) | 0.16 |" in rendered["L15R-8x"]
    assert "50,000 tokens, context 1024" in rendered["L15R-8x"]
    assert "No metrics measured" in rendered["L16R-8x"]


def test_demo_and_custom_cards(rendered: dict[str, str]) -> None:
    # The demo card is the shipped one, whose numbers build_demo.py measured (demo_results.json).
    assert rendered["demo"] == (DEMO_SAE_DIR / "README.md").read_text(encoding="utf-8")
    demo = ModelCard(rendered["demo"])
    assert demo.data.library_name == "llamascope-sdk"
    measured = json.loads((DEMO_SAE_DIR / "demo_results.json").read_text())["metrics"]
    for column in ("all non-special tokens", "excluding massive activations"):
        l0 = measured[column]["l0_mean"]
        assert f"| {l0:.2f} |" in rendered["demo"], column  # every number from the measurement
    _tables_are_well_formed(rendered["demo"])
    info = {"name": "my-tc", "model": "meta-llama/Llama-3.1-8B-Instruct", "layer": 3,
            "position": "TC", "d_model": 4096, "d_sae": 32768,
            "hook_point_in": "blocks.3.ln2.hook_normalized", "hook_point_out": "blocks.3.hook_mlp_out",
            "recipe": {"lr": 8e-4, "tokens": "800M"}}
    text = render_card(info, metrics={"delta_lm_loss": 0.05, "model": "instruct",
                                      "threshold-batch mean L0": 50.0, "train steps": 1200})
    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert "model.layers.3.post_attention_layernorm (input / rms, no gain)" in text
    assert "| lr | 0.0008 |" in text and "| delta LM loss" in text and "s_in and s_out differ" in text
    assert "| threshold-batch mean L0 | 50 |" in text and "| train steps | 1200 |" in text
    _tables_are_well_formed(text)
    with pytest.raises(ValueError, match="missing"):
        render_card({"layer": 3})


def test_render_card_accepts_names_and_refs() -> None:
    assert render_card("L0R-8x") == render_card(resolve("llama3.1-8b/0-llamascope-res-32k"))


def test_render_script(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "cards" / "render.py"), str(tmp_path), "--no-demo"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    assert "wrote 256 cards" in out.stdout
    assert (tmp_path / "L31TC-32x" / "README.md").is_file()
