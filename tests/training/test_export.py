"""A short tiny run exports a release folder the SDK loads, with a JumpReLU θ giving L0 = K."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llamascope_sdk.sae import SAE
from llamascope_sdk.training.ddp import Dist
from llamascope_sdk.training.postprocess import jumprelu_threshold, mean_l0
from llamascope_sdk.training.sources import hook_points_of, live_source
from llamascope_sdk.training.trainer import Run, export_run, threshold_inputs
from tests.helpers import raw_tensors, release_hyperparams

from .tiny import CharTokenizer, tiny_config, tiny_model


def test_threshold_gives_mean_l0_k() -> None:
    hp = release_hyperparams(d_model=64, d_sae=256)
    hp["act_fn"] = "topk"
    sae = SAE.from_raw(hp, raw_tensors(64, 256))
    x = torch.randn(512, 64) * 8
    theta = jumprelu_threshold(sae, x, 7)
    assert mean_l0(sae, x, theta) == 7.0


def test_multi_sae_run_exports_release_folders(tmp_path: Path) -> None:
    sae_cfg = tiny_config(tmp_path, total_tokens=64 * 12)
    tc_cfg = sae_cfg.model_copy(update={"name": "tiny-L1TC", "init_encoder_norm": 0.5,
                                        "hook_point_in": "blocks.1.ln2.hook_normalized",
                                        "hook_point_out": "blocks.1.hook_mlp_out"})
    cfgs = [sae_cfg, tc_cfg]
    src = live_source(sae_cfg, hook_points_of(cfgs), tiny_model(), CharTokenizer())
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


def test_evaluate_splices_and_reports_both_ev(tmp_path: Path) -> None:
    from llamascope_sdk.evaluation import evaluate

    hp = release_hyperparams(layer=1, d_model=32, d_sae=128, norm_in=1.0)
    sae = SAE.from_raw(hp, raw_tensors(32, 128))
    model = tiny_model()
    tokens = torch.randint(3, 99, (3, 20))
    tokens[:, 0] = 1
    tokens[2, 15:] = 0  # a row of 15 tokens, right-padded
    m = evaluate(model, CharTokenizer(), sae, tokens, batch_size=2, progress=False)["sae"]
    assert m.n_tokens == 19 + 19 + 14
    assert m.explained_variance_uncentred >= m.explained_variance_centred - 1
    assert m.ce_spliced != m.ce_clean
    none = evaluate(model, CharTokenizer(), sae, tokens, exclude_norm_above=1e9,
                    progress=False)["sae"]
    assert none.n_excluded == 0 and none.n_tokens == m.n_tokens
