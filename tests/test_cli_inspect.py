"""`llamascope inspect` end to end: two SAEs share one pass, each gets a store and pages that
load without the model; `show --json` reads them back; the stores equal a direct `mine`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk import SAE, FeatureStats
from llamascope_sdk.cli import app
from llamascope_sdk.mining.mine import mine
from llamascope_sdk.store.feature_store import FeatureStore

from .helpers import make_release

runner = CliRunner()


@pytest.mark.smollm
def test_inspect_two_saes_one_pass(smollm2, tmp_path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Thou art the {w} of my heart, and thy {w} is mine."
                                for w in ("joy", "light", "song", "grief", "rose")))
    other = make_release(tmp_path / "L10R", layer=10, d_model=576, d_sae=4608, norm_in=60.0)
    out = tmp_path / "stores"
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--sae", str(other), "--dataset",
                              str(text), "--tokens", "120", "--out", str(out), "-f", "4154",
                              "--max-pages", "5", "--json"])
    assert res.exit_code == 0, res.output
    reports = json.loads(res.stdout)
    assert [r["sae"] for r in reports] == ["smollm2-135m-L15R-8x", "L10R"]
    for r in reports:
        store = FeatureStore.load(r["store"])
        assert (tmp_path / "stores" / r["sae"] / "pages" / "index.html").is_file()
        assert store.stats.n_tokens == r["n_tokens"] > 0
    # The demo's store equals mining it alone, directly.
    model, tok = smollm2
    demo = SAE.from_pretrained("demo")
    direct = mine(model, tok, demo, str(text), tokens=120, context=256, batch_size=8,
                  progress=False)[demo.name]
    stored = FeatureStats.load(out / demo.name)
    torch.testing.assert_close(stored.typical, direct.stats.typical)
    torch.testing.assert_close(stored.frequency, direct.stats.frequency)
    shown = runner.invoke(app, ["show", str(out / demo.name), "4154", "--json"])
    assert shown.exit_code == 0, shown.output
    feat = json.loads(shown.stdout)
    ex = feat["top_examples"][0]
    assert len(ex["tokens"]) == len(ex["acts"]) and feat["label"].startswith("Shakespeare")
    assert ex["acts"][ex["max_index"]] == pytest.approx(ex["max"]) == pytest.approx(max(ex["acts"]))
    assert {"doc", "pos"} <= set(ex)
