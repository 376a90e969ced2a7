"""The llamascope CLI through typer's CliRunner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llamascope_sdk.cli import app

from .fakehub import fake_hub_fixture  # noqa: F401  (fixture)

runner = CliRunner()


def test_help_lists_commands() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("list", "info", "download", "encode", "steer", "ablate", "eval", "cards"):
        assert cmd in res.output


def test_list_json_has_256_and_filters() -> None:
    res = runner.invoke(app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert len(rows) == 256
    res = runner.invoke(app, ["list", "--json", "--layer", "12", "--position", "tc"])
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == ["L12TC-8x", "L12TC-32x"]
    assert rows[0]["hook_point_in"] == "blocks.12.ln2.hook_normalized"


def test_info_offline_registry_facts() -> None:
    res = runner.invoke(app, ["info", "l15r_8x", "--offline", "--json"])
    assert res.exit_code == 0, res.output
    facts = json.loads(res.stdout)
    assert facts["repo_id"] == "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x"
    assert facts["subfolder"] == "Llama3_1-8B-Base-L15R-8x"
    assert facts["neuronpedia_url"] == "https://www.neuronpedia.org/llama3.1-8b/15-llamascope-res-32k"


def test_unknown_sae_is_one_line_with_suggestions() -> None:
    res = runner.invoke(app, ["info", "L12Q-8x", "--offline"])
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    assert "unknown position 'Q'" in res.output
    res = runner.invoke(app, ["info", "L12M-9x", "--offline"])
    assert res.exit_code == 1 and "unknown width" in res.output
    res = runner.invoke(app, ["info", "L21M-8xx", "--offline"])
    assert res.exit_code == 1


def test_unknown_name_suggests_closest() -> None:
    res = runner.invoke(app, ["info", "L12MM-8x", "--offline"])
    assert res.exit_code == 1
    assert "closest" in res.output or "unknown" in res.output


def test_debug_shows_traceback() -> None:
    res = runner.invoke(app, ["--debug", "info", "L99R-8x", "--offline"])
    assert res.exit_code != 0
    assert res.exception is not None and "layer 99" in str(res.exception)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llamascope_sdk", *args], capture_output=True,
                          text=True, env=full, timeout=300)


def test_subprocess_error_is_one_line_no_traceback() -> None:
    p = _run("info", "L32R-8x", "--offline")
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert p.stderr.startswith("error: layer 32 is out of range")


def test_subprocess_offline_cold_cache(tmp_path) -> None:
    p = _run("info", "L3R-8x", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert "offline" in p.stderr.lower()
    assert "hint:" in p.stderr


# ---------------------------------------------------------------- the offline demo (real model)

@pytest.mark.smollm
def test_steer_demo_json_changes_text() -> None:
    res = runner.invoke(app, ["steer", "--sae", "demo", "-n", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["features"] == [1297] and out["sae"] == "smollm2-135m-L15R-8x"
    assert out["baseline"] != out["steered"]
    assert len(out["baseline_ids"]) == 6


@pytest.mark.smollm
def test_steer_strength_zero_reproduces_baseline() -> None:
    res = runner.invoke(app, ["steer", "--sae", "demo", "-f", "1297", "-a", "0", "-n", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["baseline_ids"] == out["steered_ids"]


@pytest.mark.smollm
def test_encode_demo_table_and_json() -> None:
    res = runner.invoke(app, ["encode", "--sae", "demo", "--prompt", "To be, or not to be", "--json", "-k", "3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["tokens"][0] == "<|im_start|>"
    name = "smollm2-135m-L15R-8x"
    assert out["top"][name][0] == []  # BOS skipped by default
    assert all(len(row) == 3 for row in out["top"][name][1:])
    res = runner.invoke(app, ["encode", "--sae", "demo", "--prompt", "To be", "--include-special", "--json"])
    assert json.loads(res.stdout)["top"][name][0] != []
    res = runner.invoke(app, ["encode", "--sae", "demo", "--prompt", "To be"])
    assert res.exit_code == 0 and "feature (activation)" in res.output


@pytest.mark.smollm
def test_ablate_demo_json() -> None:
    res = runner.invoke(app, ["ablate", "--sae", "demo", "-f", "4154", "-f", "1297", "-n", "4",
                              "--prompt", "Thou art", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["features"] == [4154, 1297]


@pytest.mark.smollm
def test_feature_out_of_range_is_one_line() -> None:
    res = runner.invoke(app, ["steer", "--sae", "demo", "-f", "4608", "-n", "2"])
    assert res.exit_code == 1
    assert "feature index 4608 is out of range; allowed are 0..4607" in res.output
    assert "Traceback" not in res.output


@pytest.mark.smollm
def test_sae_that_does_not_fit_the_model(tmp_path) -> None:
    from .helpers import make_release

    folder = make_release(tmp_path / "tiny", d_model=64, d_sae=256, layer=3)
    res = runner.invoke(app, ["encode", "--sae", str(folder), "--model", "smollm2-135m", "--prompt", "hi"])
    assert res.exit_code == 1
    assert "d_model=64 does not match the model's hidden_size=576" in res.output


def test_gated_model_without_token(fake_hub, monkeypatch) -> None:
    hub = fake_hub.hub
    hub.commit("meta-llama/Llama-3.1-8B", {"config.json": b"{}", "tokenizer_config.json": b"{}"})
    hub.gated.add("meta-llama/Llama-3.1-8B")
    res = runner.invoke(app, ["encode", "--sae", "demo", "--model", "meta-llama/Llama-3.1-8B", "--prompt", "hi"])
    assert res.exit_code == 1, res.output
    assert "could not load model 'meta-llama/Llama-3.1-8B'" in res.output
    assert "HF_TOKEN" in res.output


def test_subprocess_model_offline_cold_cache(tmp_path) -> None:
    p = _run("encode", "--sae", "demo", "--model", "meta-llama/Llama-3.1-8B", "--prompt", "hi",
             env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    assert "error: could not load model" in p.stderr and "hint:" in p.stderr


def test_subprocess_unknown_sae_suggests() -> None:
    p = _run("steer", "--sae", "L12X-8x", "-f", "1")
    assert p.returncode == 1
    assert "unknown position 'X'" in p.stderr and "Traceback" not in p.stderr


def test_download_and_info_through_fake_hub(fake_hub) -> None:
    res = runner.invoke(app, ["download", "L12R-8x", "l12m_32x", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["commit"] for r in rows] == [fake_hub.commits["R-new"], fake_hub.commits["M32"]]
    res = runner.invoke(app, ["info", "L12R-8x", "--json"])
    assert res.exit_code == 0, res.output
    facts = json.loads(res.stdout)
    hp = fake_hub.hp["L12R-8x"]
    assert facts["jump_relu_threshold"] == hp["jump_relu_threshold"]
    assert facts["dataset_norm_in"] == hp["dataset_average_activation_norm"]["in"]
    assert facts["commit"] == fake_hub.commits["R-new"]
    res = runner.invoke(app, ["info", "L12R-8x", "--revision", "v0", "--json"])
    assert json.loads(res.stdout)["subfolder"] == "Llama3_1Base-L12R-8x"


def test_download_interrupted_resumes(fake_hub, tmp_path) -> None:
    """A download killed halfway leaves a partial blob; the next run asks only for the rest."""
    from huggingface_hub import constants

    from .fakehub import main_checkpoint

    blob, blobs = main_checkpoint(fake_hub.hub)
    data, sha = blob.data, blob.sha256
    assert str(blobs).startswith(constants.HF_HUB_CACHE)  # the cache the CLI writes to
    (blobs / f"{sha}.llamascope-partial").write_bytes(data[:1000])
    res = runner.invoke(app, ["download", "L12R-8x", "--json"])
    assert res.exit_code == 0, res.output
    gets = fake_hub.hub.requests("final.safetensors", method="GET")
    assert [r.headers.get("range") for r in gets] == ["bytes=1000-"]
    assert (blobs / sha).read_bytes() == data
    assert not (blobs / f"{sha}.llamascope-partial").exists()


def test_download_cut_keeps_partial_then_resumes(fake_hub, tmp_path) -> None:
    """The connection cut every time: a clear error, the bytes kept; then a clean resume."""
    hub = fake_hub.hub
    hub.cut_after["final.safetensors"] = 20_000
    hub.cut_always = True
    res = runner.invoke(app, ["download", "L12R-8x"])
    assert res.exit_code == 1 and "resumes from the partial file" in res.output
    hub.cut_always = False
    hub.cut_after.clear()
    hub.clear_log()
    res = runner.invoke(app, ["download", "L12R-8x", "--json"])
    assert res.exit_code == 0, res.output
    ranges = [r.headers.get("range") for r in hub.requests("final.safetensors", method="GET")]
    assert len(ranges) == 1 and ranges[0] is not None and ranges[0] != "bytes=0-"


@pytest.mark.smollm
def test_eval_demo_json(tmp_path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(" = Rome = \n\nRome is the capital city of Italy. It has a long history, and many "
                    "people visit it every year to see the ancient ruins and the churches.\n" * 4)
    res = runner.invoke(app, ["eval", "demo", "--dataset", str(text), "--tokens", "120",
                              "--context", "64", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)["smollm2-135m-L15R-8x"]
    assert 5 < out["l0_mean"] < 200
    assert out["explained_variance_centred"] < out["explained_variance_uncentred"] <= 1
    assert out["delta_lm_loss"] == pytest.approx(out["ce_spliced"] - out["ce_clean"])


@pytest.mark.smollm
def test_relative_strength_uses_the_shipped_feature_stats() -> None:
    """The demo ships feature_stats.safetensors: --relative 4 equals a raw 4 x typical."""
    from llamascope_sdk import FeatureStats
    from llamascope_sdk.loading.demo import DEMO_SAE_DIR

    typical = float(FeatureStats.load(DEMO_SAE_DIR / "feature_stats.safetensors").typical[1297])
    rel = runner.invoke(app, ["steer", "--sae", "demo", "-a", "4", "--relative", "-n", "5", "--json"])
    raw = runner.invoke(app, ["steer", "--sae", "demo", "-a", str(4 * typical), "-n", "5", "--json"])
    assert rel.exit_code == 0 and raw.exit_code == 0, rel.output + raw.output
    assert json.loads(rel.stdout)["steered_ids"] == json.loads(raw.stdout)["steered_ids"]


@pytest.mark.smollm
def test_encode_gate_option_and_bad_values() -> None:
    res = runner.invoke(app, ["encode", "--sae", "demo", "--prompt", "To be", "--gate", "saelens", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["encode", "--sae", "demo", "--prompt", "To be", "--gate", "foo"])
    assert res.exit_code == 1 and "unknown gate 'foo': allowed are reference, saelens" in res.output
    assert "looks like a bug" not in res.output
    res = runner.invoke(app, ["steer", "--sae", "demo", "--dtype", "float8", "-n", "2"])
    assert res.exit_code == 1 and "unknown dtype 'float8'" in res.output


def test_cards_command_renders_every_checkpoint(tmp_path) -> None:
    res = runner.invoke(app, ["cards", str(tmp_path)])
    assert res.exit_code == 0, res.output
    cards = sorted(tmp_path.rglob("README.md"))
    assert len(cards) == 257  # 256 releases + the demo SAE
    text = next(c for c in cards if "L12TC-32x" in str(c)).read_text()
    assert 'SAE.from_pretrained("L12TC-128k")' in text and "base_model: meta-llama/Llama-3.1-8B" in text
