"""Load then save keeps everything the folder had; push_to_hub follows huggingface_hub."""

from __future__ import annotations

import json

import torch

from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.loading.sae import SAE
from tests.helpers import raw_tensors, release_hyperparams, write_release

D, F = 64, 256


def _folder(tmp_path, **extra):
    hp = release_hyperparams(d_model=D, d_sae=F)
    hp.update(extra)
    return write_release(tmp_path / "src", hp, raw_tensors(D, F)), hp


def test_hyperparams_kept_exactly(tmp_path) -> None:
    """Unknown fields, key order, int spelling of numbers and the dtype spelling survive."""
    src, hp = _folder(tmp_path, dtype="bfloat16", my_note={"a": [1, 2]}, jump_relu_threshold=1,
                      zz_last=None)
    (src / "lm_config.json").write_text('{"model_name": "meta-llama/Llama-3.1-8B", "odd": [1]}')
    out = SAE.from_pretrained(src).save_pretrained(tmp_path / "out")
    text = (out / "hyperparams.json").read_text()
    saved = json.loads(text)
    assert list(saved) == list(hp) and saved == hp
    assert '"jump_relu_threshold": 1,' in text and saved["dtype"] == "bfloat16"
    assert json.loads((out / "lm_config.json").read_text()) == {"model_name": "meta-llama/Llama-3.1-8B",
                                                                  "odd": [1]}
    # a dtype change is written (fp32 tensors now)
    sae = SAE.from_pretrained(out)
    sae.file_dtype = torch.float32
    assert json.loads((sae.save_pretrained(tmp_path / "f32") / "hyperparams.json").read_text())["dtype"] == \
        "torch.float32"


def test_card_stats_labels_kept_and_card_rendered_when_missing(tmp_path) -> None:
    from huggingface_hub import ModelCard

    src, _ = _folder(tmp_path)
    out = SAE.from_pretrained(src).save_pretrained(tmp_path / "a")
    card = ModelCard((out / "README.md").read_text())
    assert card.data.base_model == "meta-llama/Llama-3.1-8B" and card.data.library_name == "llamascope-sdk"
    assert "sae" in card.data.tags and "llamascope" in card.data.tags
    (src / "README.md").write_text("---\nlicense: mit\n---\n# my own card\n")
    sae = SAE.from_pretrained(src)
    sae.stats = FeatureStats.from_sums(torch.rand(F) * 10, torch.randint(1, 5, (F,)).float(), 100)
    sae.labels = {3: "cats", 7: "dogs"}
    out = sae.save_pretrained(tmp_path / "b")
    assert (out / "README.md").read_text() == "---\nlicense: mit\n---\n# my own card\n"
    again = SAE.from_pretrained(out)
    assert again.labels == {3: "cats", 7: "dogs"} and again.stats is not None
    assert (out / "feature_stats.safetensors").is_file()
    x = torch.randn(5, D)
    assert torch.equal(again.encode(x), sae.encode(x))


def test_demo_round_trip(tmp_path) -> None:
    demo = SAE.from_pretrained("demo")
    out = demo.save_pretrained(tmp_path / "demo")
    again = SAE.from_pretrained(out)
    x = torch.randn(4, demo.d_model) * 5
    assert torch.equal(again.encode(x), demo.encode(x))
    assert (out / "README.md").is_file() and again.labels == demo.labels


def test_push_to_hub_conventions(tmp_path, monkeypatch) -> None:
    from huggingface_hub import CommitInfo, HfApi

    calls: dict = {}
    info = CommitInfo(commit_url="https://huggingface.co/me/x/commit/abc", commit_message="m",
                      commit_description="", oid="abc", pr_url="https://huggingface.co/me/x/discussions/1")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", kw))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.setdefault("branch", kw))

    def upload(self, **kw):
        calls["upload"] = kw
        return info

    monkeypatch.setattr(HfApi, "upload_folder", upload)
    src, _ = _folder(tmp_path)
    sae = SAE.from_pretrained(src)
    got = sae.push_to_hub("me/x", branch="dev", private=True, token="t", commit_message="hello")
    assert got is info and got.oid == "abc"
    assert calls["branch"] == {"branch": "dev", "exist_ok": True}
    assert calls["upload"]["revision"] == "dev" and calls["upload"]["commit_message"] == "hello"
    assert "create_pr" not in calls["upload"]
    calls.clear()
    got = sae.push_to_hub("me/x", create_pr=True)
    assert calls["upload"]["create_pr"] is True and "branch" not in calls and got.pr_url
