"""Recipes for the 256 checkpoints, serialisation, overrides, the paper variant, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamascope_sdk.loading.registry import list_saes
from llamascope_sdk.training.config import TrainConfig
from llamascope_sdk.training.errors import TrainConfigError
from llamascope_sdk.training.recipes import all_recipes, paper_overrides, recipe_for

from .tiny import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_all_256_recipes_follow_the_released_files() -> None:
    recipes = all_recipes()
    assert len(recipes) == 256 == len(list_saes())
    by = {r.name: r for r in recipes}
    r8, r32, tc = by["L15R-8x"], by["L15R-32x"], by["L19TC-8x"]
    assert (r8.total_steps, r8.k_warmup_steps) == (390_625, 39_062)
    assert (r32.total_steps, r32.k_warmup_steps) == (781_250, 78_125)
    assert r8.betas == (0.9, 0.9999) and r8.warmup_steps == 5000 and r8.lr_end_ratio == 0.01
    assert r8.k_init == 2048 and r32.init_decoder_norm == 0.5 and r8.clip_grad_norm == 0.001
    assert tc.hook_point_in == "blocks.19.ln2.hook_normalized"
    assert tc.hook_point_out == "blocks.19.hook_mlp_out" and tc.init_encoder_norm == 0.5
    assert by["L3A-8x"].hook_point_in == "blocks.3.hook_attn_out"


def test_paper_variant_and_overrides() -> None:
    r = recipe_for("L12M-128k")
    p = r.model_validate({**r.to_dict(), **paper_overrides(r)})
    assert p.betas == (0.9, 0.999) and p.warmup_steps == 10_000 and p.lr_end_ratio == 0
    assert p.k_init == 4096 and p.init_decoder_norm == pytest.approx(0.25)
    o = r.with_overrides(["lr=4e-4", "betas=[0.9, 0.99]", "clip_grad_norm=null"])
    assert o.lr == 4e-4 and o.betas == (0.9, 0.99) and o.clip_grad_norm is None
    with pytest.raises(ValueError, match="bad override"):
        r.with_overrides(["no_such_field=1"])
    with pytest.raises(ValueError, match="top_k"):
        r.with_overrides(["top_k=999999"])


def test_yaml_json_round_trip(tmp_path: Path) -> None:
    r = recipe_for("L0TC-32x")
    for suffix in (".yaml", ".json"):
        r.save(tmp_path / f"r{suffix}")
        assert TrainConfig.load(tmp_path / f"r{suffix}") == r


def test_cli_print_config_and_paper_flag() -> None:
    cmd = [sys.executable, str(ROOT / "training/run.py"), "--sae", "L12M-128k", "--set",
           "lr=4e-4", "--paper", "--print-config", "--format", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    cfg = json.loads(out)
    assert cfg["lr"] == 4e-4 and cfg["variant"] == "paper" and cfg["expansion_factor"] == 32


def test_training_is_not_imported_by_the_package() -> None:
    code = "import llamascope_sdk, sys; print(any('training' in m for m in sys.modules if m.startswith('llamascope_sdk')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("override", "field"), [
    ("lr=.inf", "lr"), ("lr=.nan", "lr"), ("lr=0", "lr"), ("lr=-1e-3", "lr"),
    ("eps=0", "eps"), ("betas=[0.9, 1.5]", "betas"), ("clip_grad_norm=.inf", "clip_grad_norm"),
    ("total_tokens=0", "total_tokens"), ("batch_size=-2", "batch_size"),
    ("context_size=1", "context_size"), ("norm_tokens=0", "norm_tokens"),
    ("threshold_tokens=0", "threshold_tokens"), ("buffer_tokens=100", "buffer_tokens"),
    ("init_decoder_norm=.nan", "init_decoder_norm"), ("lr_warmup_steps=2.5", "lr_warmup_steps"),
    ("keep_checkpoints=0", "keep_checkpoints"), ("seed=-1", "seed"), ("name=' '", "name")])
def test_invalid_values_are_refused_naming_the_field(override: str, field: str) -> None:
    with pytest.raises(TrainConfigError, match=field):
        recipe_for("L15R-8x").with_overrides([override])


def test_context_larger_than_the_model_window_is_refused(tmp_path: Path, tiny_llama,
                                                         char_tokenizer) -> None:
    from llamascope_sdk.training.sources import live_source

    cfg = tiny_config(tmp_path, context_size=256)  # tiny_llama: max_position_embeddings=128
    with pytest.raises(TrainConfigError, match="context_size=256.*max_position_embeddings=128"):
        live_source(cfg, [cfg.hook_point_in], tiny_llama, char_tokenizer)
    with pytest.raises(TrainConfigError, match="d_model=32.*hidden_size=64"):
        live_source(tiny_config(tmp_path, d_model=32), [cfg.hook_point_in], tiny_llama,
                    char_tokenizer)


@pytest.mark.parametrize("text", ["lr: [unclosed", "- a list\n", "name: x\nlr: .inf\n"])
def test_recipe_files_that_cannot_be_used(tmp_path: Path, text: str) -> None:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(TrainConfigError, match="r.yaml"):
        TrainConfig.load(tmp_path / "r.yaml")
    with pytest.raises(TrainConfigError, match="does not exist"):
        TrainConfig.load(tmp_path / "missing.yaml")
