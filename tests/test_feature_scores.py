"""Feature selection scores: the batched, KV-cached computation against a plain one-feature-at-
a-time computation written from Arad et al.'s output_score.py (full forward, argsort ranks)."""

from __future__ import annotations

import math

import pytest
import torch

from llamascope_sdk.base.errors import CorruptCheckpointError, InputError
from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.core.hooks import hooked
from llamascope_sdk.core.logit_lens import final_norm_and_unembed
from llamascope_sdk.core.sites import parse_hook_point
from llamascope_sdk.loading.models import tokenize
from llamascope_sdk.store.scores import SCORES_FILE, FeatureScores, load_scores, score_features
from tests.helpers import tiny_sae


def reference_scores(model, tok, sae, prompt: str, feature: int, amp: float = 10.0,
                     k: int = 20) -> tuple[float, float]:
    """One feature, the paper code's way: full forward of the prompt, edit at the last
    position, argsort ranks of the logit-lens tokens."""
    ids = tokenize(tok, prompt)
    site = parse_hook_point(sae.hyperparams.hook_point_out)
    acts = {}

    def read(y):
        acts["y"] = y.detach()

    with torch.no_grad(), hooked(model, {site: read}):
        clean = model(ids).logits[0, -1]
    f_last = sae.encode(acts["y"][0, -1])
    c = amp * float(f_last.max())

    def edit(y):
        y = y.clone()
        y[:, -1] += c * sae.W_dec[feature].to(y.dtype)
        return y

    with torch.no_grad(), hooked(model, {site: edit}):
        logits = model(ids).logits[0, -1]
    probs = torch.softmax(logits.double(), 0)
    norm, head = final_norm_and_unembed(model)
    with torch.no_grad():
        lens = torch.softmax(head(norm(sae.W_dec[feature:feature + 1])).double(), 1)
    lens_tokens = lens.topk(min(k, lens.shape[1]), dim=1).indices[0].tolist()
    order = torch.argsort(probs, descending=True)
    ranks = [int((order == t).nonzero()[0]) for t in lens_tokens]
    top_prob = float(probs[lens_tokens].max())
    output = (1 - min(ranks) / probs.shape[0]) * top_prob
    dtc = float(probs.max()) - float(torch.softmax(clean.double(), 0).max())
    return output, dtc


def test_batched_scores_match_one_at_a_time(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=1, d_sae=256, threshold=0.0)
    prompt = "hello there, friend"
    feats = [0, 3, 17, 100, 255]
    s = score_features(tiny_llama, char_tokenizer, sae, prompt=prompt, batch_size=2,
                       features=feats, lens_k=5, progress=False)
    for f in feats:
        ref_out, ref_dtc = reference_scores(tiny_llama, char_tokenizer, sae, prompt, f, k=5)
        assert s.output_score[f].item() == pytest.approx(ref_out, rel=1e-4, abs=1e-7)
        assert s.delta_token_confidence[f].item() == pytest.approx(ref_dtc, abs=1e-5)
    others = [i for i in range(256) if i not in feats]
    assert torch.isnan(s.output_score[others]).all()
    assert s.top(3) == sorted(feats, key=lambda i: -s.output_score[i].item())[:3]
    assert s.get(others[0]) is None
    assert s.get(feats[0])["output_score_rank"] == 1 + sum(
        s.output_score[g].item() > s.output_score[feats[0]].item() for g in feats)


def test_batch_size_does_not_change_scores(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=2, d_sae=64, threshold=0.0)
    a = score_features(tiny_llama, char_tokenizer, sae, prompt="abc def", batch_size=64,
                       progress=False)
    b = score_features(tiny_llama, char_tokenizer, sae, prompt="abc def", batch_size=7,
                       progress=False)
    torch.testing.assert_close(a.output_score, b.output_score, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.delta_token_confidence, b.delta_token_confidence)
    assert a.meta["added_length"] == pytest.approx(10 * a.meta["max_activation"])


def test_save_load_roundtrip_and_errors(tmp_path, tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=1, d_sae=64, threshold=0.0)
    s = score_features(tiny_llama, char_tokenizer, sae, prompt="xyz", progress=False)
    assert load_scores(tmp_path) is None
    path = s.save(tmp_path)
    assert path.name == SCORES_FILE
    back = load_scores(tmp_path)
    assert back is not None
    torch.testing.assert_close(back.output_score, s.output_score)
    assert back.meta["prompt"] == "xyz"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / SCORES_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CorruptCheckpointError):
        FeatureScores.load(tmp_path / "bad")
    with pytest.raises(InputError, match="empty"):
        score_features(tiny_llama, char_tokenizer, sae, prompt="  ", progress=False)
    with pytest.raises(InputError, match="top_k|unknown"):
        s.top(3, by="fluency")


def test_prompt_where_nothing_fires_is_refused(tiny_llama, char_tokenizer):
    sae = tiny_sae(layer=1, d_sae=64, threshold=1e9)  # no feature can pass this threshold
    with pytest.raises(InputError, match="no feature fires"):
        score_features(tiny_llama, char_tokenizer, sae, prompt="abc", progress=False)


@pytest.mark.smollm
def test_demo_scores_match_reference(smollm2):
    from llamascope_sdk import SAE

    model, tok = smollm2
    sae = SAE.from_pretrained("demo")
    feats = [4154, 1297, 1062, 7]
    s = score_features(model, tok, sae, features=feats, progress=False)
    for f in feats:
        ref_out, ref_dtc = reference_scores(model, tok, sae, "From my experience,", f)
        assert s.output_score[f].item() == pytest.approx(ref_out, rel=2e-3, abs=1e-6)
        assert s.delta_token_confidence[f].item() == pytest.approx(ref_dtc, abs=1e-4)
        assert not math.isnan(s.output_score[f].item())


@pytest.mark.smollm
@pytest.mark.slow
def test_cli_scores_reach_store_pages_show_and_search(smollm2, tmp_path):
    import json

    from typer.testing import CliRunner

    from llamascope_sdk.cli import app

    runner = CliRunner()
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Thou art the {w} of my heart, and thy {w} is mine."
                                for w in ("joy", "light", "song", "grief", "rose")))
    out = tmp_path / "store"
    res = runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", str(text), "--tokens",
                              "120", "--out", str(out), "-f", "4154", "-f", "1297",
                              "--max-pages", "3"])
    assert res.exit_code == 0, res.output
    bad = runner.invoke(app, ["score-features", "--sae", "demo", "--store", str(tmp_path)])
    assert bad.exit_code == 1 and "not a complete feature store" in bad.output
    res = runner.invoke(app, ["score-features", "--sae", "demo", "--store", str(out), "-f",
                              "4154", "-f", "1297", "-f", "1062", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    scores = FeatureScores.load(out)
    assert [r["feature"] for r in report["top"]] == scores.top(3)
    assert torch.isfinite(scores.output_score[[4154, 1297, 1062]]).all()
    shown = json.loads(runner.invoke(app, ["show", str(out), "4154", "--json"]).stdout)
    assert shown["scores"]["output_score"] == pytest.approx(scores.output_score[4154].item())
    index = (out / "pages" / "index.html").read_text()
    assert "output score" in index
    assert 'id="output-score"' in (out / "pages" / "features" / "4154.html").read_text()
    romeo = ["--sae", "demo", "--prompt", "O Romeo, Romeo, wherefore art thou Romeo?",
             "--store", str(out), "--json"]
    res = runner.invoke(app, ["search", *romeo, "--top", "25"])
    pool = [h["feature"] for h in json.loads(res.stdout)["hits"]]
    assert len(pool) == 25
    res = runner.invoke(app, ["score-features", "--sae", "demo", "--store", str(out),
                              *[a for f in pool for a in ("-f", str(f))]])
    assert res.exit_code == 0, res.output
    scores = FeatureScores.load(out)
    res = runner.invoke(app, ["search", *romeo, "--top", "5", "--sort", "output-score"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)["hits"]
    want = sorted(pool, key=lambda f: -scores.output_score[f].item())[:5]
    assert [h["feature"] for h in hits] == want
    assert [h["output_score"] for h in hits] == pytest.approx(
        [scores.output_score[f].item() for f in want])
    # without a prompt: the store's best-scored features, no model, dense ones left out
    res = runner.invoke(app, ["search", "--sae", "demo", "--store", str(out), "--sort",
                              "output-score", "--top", "4", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)["hits"]
    st = FeatureStats.load(out)
    ranked = [f for f in scores.top(scores.d_sae) if st.frequency[f] <= 0.1][:4]
    assert [h["feature"] for h in listed] == ranked
    assert [h["output_score"] for h in listed] == pytest.approx(
        [scores.output_score[f].item() for f in ranked])
    unscored = tmp_path / "unscored"
    runner.invoke(app, ["inspect", "--sae", "demo", "--dataset", str(text), "--tokens", "60",
                        "--out", str(unscored), "-f", "4154", "--max-pages", "1"])
    res = runner.invoke(app, ["search", "--sae", "demo", "--store", str(unscored), "--sort",
                              "output-score"])
    assert res.exit_code != 0 and "score-features" in res.output
