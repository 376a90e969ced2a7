"""A short tiny run exports a release folder the SDK loads, with a JumpReLU θ giving L0 = K."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamascope_sdk.base.dist import Dist
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.training.loop import Run, export_run, threshold_inputs
from llamascope_sdk.training.postprocess import jumprelu_threshold, mean_l0
from llamascope_sdk.training.sources import hook_points_of, live_source
from tests.helpers import raw_tensors, release_hyperparams

from .tiny import tiny_config


def test_threshold_gives_mean_l0_k() -> None:
    hp = release_hyperparams(d_model=64, d_sae=256)
    hp["act_fn"] = "topk"
    sae = SAE.from_raw(hp, raw_tensors(64, 256))
    x = torch.randn(512, 64) * 8
    theta = jumprelu_threshold(sae, x, 7)
    assert mean_l0(sae, x, theta) == 7.0


def test_multi_sae_run_exports_release_folders(tmp_path: Path, tiny_llama, char_tokenizer) -> None:
    sae_cfg = tiny_config(tmp_path, total_tokens=64 * 12)
    tc_cfg = sae_cfg.model_copy(update={"name": "tiny-L1TC", "init_encoder_norm": 0.5,
                                        "hook_point_in": "blocks.1.ln2.hook_normalized",
                                        "hook_point_out": "blocks.1.hook_mlp_out"})
    cfgs = [sae_cfg, tc_cfg]
    src = live_source(sae_cfg, hook_points_of(cfgs), tiny_llama, char_tokenizer)
    run = Run(cfgs, Dist(), source=src)
    run.fit(progress=False)
    assert run.finished and run.step == 12
    folders = export_run(run, tmp_path / "export")
    rows = threshold_inputs(run, sae_cfg)
    want = set(release_hyperparams())
    for folder, cfg in zip(folders, cfgs, strict=True):
        hp = json.loads((folder / "hyperparams.json").read_text())
        assert want <= set(hp) and hp["act_fn"] == "jumprelu" and hp["top_k"] == 4
        assert hp["init_encoder_with_decoder_transpose"] is (cfg is sae_cfg)
        assert (folder / "recipe.yaml").is_file() and "released" in (folder / "README.md").read_text()
        sae = SAE.from_pretrained(folder)
        l0 = (sae.encode(rows[cfg.hook_point_in]) > 0).float().sum(-1).mean()
        assert abs(float(l0) - 4) < 0.05  # exact up to the bf16 file round trip

