"""Issue 17 case 10: every command that runs the model checks its window. ``search`` and
``encode`` took a 10,002-token prompt against SmolLM2's window of 8,192 (``steer`` refused
it) and ``inspect --context`` had no check; now each refuses with one line, before any
forward or any corpus is read."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk import FeatureStats
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.cli import app
from llamascope_sdk.steering.reading import read_features
from llamascope_sdk.store.search import search_features

from .conftest import CharTokenizer
from .helpers import tiny_sae

runner = CliRunner()
#: 10,001 SmolLM2 tokens ("a", then " a" 10,000 times), 10,002 with the BOS.
LONG = "a" + " a" * 10_000


def test_read_and_search_refuse_a_prompt_longer_than_the_window(tiny_llama) -> None:
    sae = tiny_sae(d_model=64)
    sae.stats = FeatureStats.from_sums(torch.ones(256, dtype=torch.float64),
                                       torch.ones(256, dtype=torch.float64), 10)
    ran = []
    h = tiny_llama.model.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        for call in (lambda: read_features(tiny_llama, CharTokenizer(), sae, "x" * 200),
                     lambda: search_features(tiny_llama, CharTokenizer(), sae, "x" * 200)):
            with pytest.raises(InputError) as info:
                call()
            assert str(info.value) == "the prompt is 201 tokens, more than the model's window of 128 positions"
        assert read_features(tiny_llama, CharTokenizer(), sae, "x" * 127).token_ids[-1] > 2
    finally:
        h.remove()
    assert len(ran) == 1  # only the prompt that fits reached the model


def test_measure_stats_and_scoring_refuse_text_longer_than_the_window(tiny_llama) -> None:
    from llamascope_sdk.steering.reading import measure_feature_stats
    from llamascope_sdk.store.scores import score_features

    sae = tiny_sae(d_model=64)
    with pytest.raises(InputError) as info:
        measure_feature_stats(tiny_llama, CharTokenizer(), sae, ["short", "y" * 300])
    assert str(info.value) == "a text is 301 tokens, more than the model's window of 128 positions"
    with pytest.raises(InputError) as info:
        score_features(tiny_llama, CharTokenizer(), sae, prompt="z" * 130, progress=False)
    assert str(info.value) == ("the scoring prompt is 131 tokens, more than the model's window "
                               "of 128 positions")


def _one_line(res, message: str) -> None:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")] == [f"error: {message}"]


@pytest.mark.smollm
@pytest.mark.parametrize("command", [["encode"], ["search"]])
def test_encode_and_search_refuse_10002_tokens(command) -> None:
    res = runner.invoke(app, [*command, "--sae", "demo", "--prompt", LONG])
    _one_line(res, "the prompt is 10002 tokens, more than the model's window of 8192 positions")


@pytest.mark.smollm
def test_inspect_refuses_a_context_beyond_the_window(tmp_path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", str(corpus),
                              "--context", "9000", "--out", str(tmp_path / "store")])
    _one_line(res, "--context is 9000 tokens, more than the model's window of 8192 positions")
    assert not (tmp_path / "store").exists()


@pytest.mark.smollm
def test_inspect_checks_compatibility_and_the_demo_once(tmp_path, monkeypatch) -> None:
    """Issue 16: inspect ran the compatibility check three times and the demo check three
    times. Now: one compatibility check (the CLI's; mine() finds it done) and the demo decided
    once by the loader's front door and once by the command."""
    from llamascope_sdk.loading import compat, demo, locate

    calls = {"compat": 0, "demo": 0}
    real_hidden, real_demo = compat.hidden_size, demo.is_demo

    def hidden(m):
        calls["compat"] += 1
        return real_hidden(m)

    def is_demo(name):
        calls["demo"] += 1
        return real_demo(name)

    monkeypatch.setattr(compat, "hidden_size", hidden)
    monkeypatch.setattr(demo, "is_demo", is_demo)
    monkeypatch.setattr(locate, "is_demo", is_demo)
    corpus = tmp_path / "c.txt"
    corpus.write_text("To be, or not to be, that is the question.\n")
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", str(corpus), "--tokens",
                              "32", "--no-pages", "--out", str(tmp_path / "store")])
    assert res.exit_code == 0, res.output
    assert calls == {"compat": 1, "demo": 2}
