"""`llamascope explain` on real mined stores (an SAE and a transcoder on the tiny model) with
the fake endpoint; explanations then show in pages, `show`, `show --json`, `search --text` and
as feature_labels.json that an SAE folder loads."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk import SAE
from llamascope_sdk.cli import app
from llamascope_sdk.cli.explain import top_frequency
from llamascope_sdk.explain import plan_run
from llamascope_sdk.explain.examples import example_sets
from llamascope_sdk.mining.mine import mine
from llamascope_sdk.store.feature_store import FeatureStore
from llamascope_sdk.store.pages import write_pages

from .conftest import CharTokenizer
from .fake_endpoint import FakeEndpoint
from .test_hooks import synthetic_sae
from .test_mining import DOCS

runner = CliRunner()


def explainer(messages):
    """Explains by counting excerpts; as a scorer says 1 for every excerpt (so every balanced
    accuracy is (1 + 0) / 2 = 0.5 by hand)."""
    n = messages[1]["content"].count("Example ")
    if "Answer with one short phrase" in messages[0]["content"]:
        return f"letters seen in {n} excerpts"
    return "[" + ", ".join(["1"] * n) + "]"


@pytest.fixture(scope="module", params=["M", "TC"])
def store_and_sae(request, tiny_llama, tmp_path_factory):
    torch.manual_seed(0)
    ids = torch.randint(3, 99, (2, 24))
    ids[:, 0] = 1
    sae = synthetic_sae(tiny_llama, ids, 1, request.param, d_sae=96, l0=12)
    res = mine(tiny_llama, CharTokenizer(), sae, DOCS, tokens=300, context=40, batch_size=4,
               top_n=4, n_samples=20, example_context=8, window_before=3, window_after=2,
               n_nonactivating=10, nonactivating_pool=40, progress=False)[sae.name]
    folder = tmp_path_factory.mktemp(f"store{request.param}") / "store"
    store = FeatureStore.from_result(res, CharTokenizer(), model=tiny_llama, sae_spec="my-sae")
    store.save(folder, extra=lambda s, tmp: write_pages(s, tmp / "pages"))
    sae_dir = tmp_path_factory.mktemp(f"sae{request.param}") / "sae"
    sae.save_pretrained(sae_dir)
    return FeatureStore.load(folder), sae_dir


def test_explain_then_everywhere(store_and_sae):
    store, sae_dir = store_and_sae
    feats = top_frequency(store, 3)  # not dense: they have silent contexts to score on
    assert feats
    spec = ",".join(map(str, feats))
    plan = plan_run(store, feats, "fake-explainer")
    with FakeEndpoint(reply=explainer, lifetime=60) as fake:
        r = runner.invoke(app, ["explain", str(store.path), "--features", spec, "--endpoint",
                                fake.url, "--model", "fake-explainer", "--save-labels-to",
                                str(sae_dir)])
        assert r.exit_code == 0, r.output
        assert f"to send: {plan.estimate.requests} requests for {len(feats)} features" in r.stderr
        assert len(fake.requests) == plan.estimate.requests > 3  # scorers ran
        again = runner.invoke(app, ["explain", str(store.path), "--features", spec,
                                    "--endpoint", fake.url, "--model", "fake-explainer"])
        assert "to send: 0 requests" in again.stderr and len(fake.requests) == plan.estimate.requests
    f = feats[0]
    text = f"letters seen in {len(example_sets(store, f).explain)} excerpts"
    shown = runner.invoke(app, ["show", str(store.path), str(f)])
    assert f"explanation: {text!r}  (detection 0.50, fuzzing 0.50;" in shown.output
    assert "fake-explainer" in shown.output
    js = json.loads(runner.invoke(app, ["show", str(store.path), str(f), "--json"]).stdout)
    rec = js["explanations"][0]
    assert rec["explanation"] == text and rec["note"] is None
    assert rec["scores"]["detection"]["balanced_accuracy"] == 0.5
    assert rec["scores"]["fuzzing"]["tp"] == len(example_sets(store, f).activating)
    page = (store.path / "pages" / "features" / f"{f}.html").read_text()
    assert text in page and "fake-explainer" in page and "detection 0.50" in page
    found = runner.invoke(app, ["search", "--sae", "my-sae", "--store", str(store.path),
                                "--text", "letters excerpts", "--json"])
    assert found.exit_code == 0, found.output
    assert {h["feature"] for h in json.loads(found.stdout)["hits"]} == set(feats)
    assert SAE.from_pretrained(sae_dir).labels[f] == f"{text} (detection 0.50, fuzzing 0.50)"


def test_bad_input_is_one_line_before_any_request(store_and_sae):
    store, _ = store_and_sae
    cases = [
        (["--features", "0-3", "--endpoint", "http://127.0.0.1:9/v1"], "--endpoint needs --model"),
        (["--features", "5-2", "--endpoint", "http://127.0.0.1:9/v1", "-m", "x"], "runs backwards"),
        (["--features", "0-999", "--endpoint", "http://127.0.0.1:9/v1", "-m", "x"], "out of range 0..95"),
        (["--endpoint", "http://127.0.0.1:9/v1", "-m", "x"], "exactly one of --features"),
        (["--features", "1", "--endpoint", "ftp://x", "-m", "x"], "not an http(s) URL"),
        (["--features", "1", "--endpoint", "http://127.0.0.1:9/v1", "-m", "x",
          "--api-key-env", "NO_SUCH_VAR_FOR_SURE"], "NO_SUCH_VAR_FOR_SURE: that environment"),
        (["--features", "0-95", "--endpoint", "http://127.0.0.1:9/v1", "-m", "x",
          "--max-cost-tokens", "10"], "above --max-cost-tokens 10; nothing was sent"),
    ]
    for args, message in cases:
        r = runner.invoke(app, ["explain", str(store.path), *args])
        assert r.exit_code == 1, (args, r.output)
        assert message in r.stderr, (args, r.stderr)
        assert r.stderr.count("error:") == 1


def test_top_frequency_picks_the_most_frequent_non_dense_features(store_and_sae):
    store, _ = store_and_sae
    r = runner.invoke(app, ["explain", str(store.path), "--top-frequency", "4", "--endpoint",
                            "http://127.0.0.1:9/v1", "-m", "x", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    freq = store.stats.frequency.tolist()
    want = sorted((i for i, f in enumerate(freq) if 0 < f <= 0.1), key=lambda i: (-freq[i], i))[:4]
    out = json.loads(r.stdout)
    assert out["todo"] == want
    assert out["todo"] and out["estimate"]["requests"] == plan_run(store, want, "x").estimate.requests


def test_search_selects_the_features_search_ranks(store_and_sae, tiny_llama, monkeypatch):
    from llamascope_sdk.cli import explain as cli_explain
    from llamascope_sdk.store.search import search_features

    store, sae_dir = store_and_sae
    sae = SAE.from_pretrained(sae_dir)
    monkeypatch.setattr(cli_explain, "_load", lambda st, device, dtype: (sae, tiny_llama, CharTokenizer()))
    r = runner.invoke(app, ["explain", str(store.path), "--search", "the cat sat", "--top", "3",
                            "--endpoint", "http://127.0.0.1:9/v1", "-m", "x", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    want = [h.feature for h in search_features(tiny_llama, CharTokenizer(), sae, "the cat sat",
                                               stats=store.stats, top=3)]
    assert want and json.loads(r.stdout)["todo"] == want
