"""Llamascopium 2 export/import. Its math is written out here by hand (no lm_saes import),
dataset-wise mode, s = sqrt(D)/n:

    h  = (s_in x) @ W_E + b_E
    g  = h * ||W_D[i]||  if sparsity_include_decoder_norm else h
    f  = h * (g > exp(log_jumprelu_threshold))
    y^ = (f @ W_D + b_D) / s_out
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamascope_sdk.loading.convert import convert
from llamascope_sdk.loading.sae import SAE
from tests.helpers import (
    make_release,
    raw_tensors,
    reference_decode,
    reference_encode,
    release_hyperparams,
)

D, F = 64, 256


def lms_forward(folder, x):
    cfg = json.loads((folder / "config.json").read_text())
    t = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    s_in = s_out = 1.0
    if cfg["norm_activation"] == "dataset-wise":
        s_in = math.sqrt(cfg["d_model"]) / float(t["dataset_average_activation_norm." + cfg["hook_point_in"]])
        s_out = math.sqrt(cfg["d_model"]) / float(t["dataset_average_activation_norm." + cfg["hook_point_out"]])
    h = (s_in * x.double()) @ t["W_E"] + t["b_E"]
    g = h * t["W_D"].norm(dim=1) if cfg["sparsity_include_decoder_norm"] else h
    f = h * (g > t["activation_function.log_jumprelu_threshold"].exp())
    return f, (f @ t["W_D"] + t["b_D"]) / s_out, t


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("position", ["R", "TC"])
def test_export_reproduces_reference(tmp_path, position) -> None:
    """Same firing mask and reconstruction as spec 3.2; values are training-space
    (f_ours = ||d_i|| f / s_out); tensors are the release file's, bit for bit."""
    hp = release_hyperparams(position=position, d_model=D, d_sae=F)
    raw = raw_tensors(D, F)
    src = make_release(tmp_path / "src", position=position, d_model=D, d_sae=F)
    out = convert(src, "llamascopium", tmp_path / "lms")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["act_fn"] == "jumprelu" and cfg["sparsity_include_decoder_norm"] is True
    assert (cfg["hook_point_in"], cfg["hook_point_out"]) == (hp["hook_point_in"], hp["hook_point_out"])
    x = torch.randn(400, D) * 4
    f, y, t = lms_forward(out, x)
    f_ref = reference_encode(hp, raw, x)
    assert torch.equal(f != 0, f_ref > 0)
    s_out = math.sqrt(D) / hp["dataset_average_activation_norm"]["out"]
    assert rel(f * t["W_D"].norm(dim=1) / s_out, f_ref) < 1e-5
    assert rel(y, reference_decode(hp, raw, f_ref)) < 1e-5
    assert torch.equal(t["W_E"].t().to(torch.bfloat16), raw["encoder.weight"])  # bf16, untouched
    back = SAE.from_pretrained(out)
    sae = SAE.from_pretrained(src)
    assert not back.per_feature_threshold
    assert abs(float(back.threshold) - hp["jump_relu_threshold"]) < 1e-6
    assert torch.equal(back.encode(x) > 0, sae.encode(x) > 0)
    assert rel(back.encode(x), sae.encode(x)) < 1e-5 and rel(back(x), sae(x)) < 1e-5


def test_import_without_decoder_norm_gating(tmp_path) -> None:
    """A Llamascopium checkpoint gating on h (sparsity_include_decoder_norm false) with
    per-feature thresholds: imported exactly, per-feature threshold kept."""
    g = torch.Generator().manual_seed(3)
    W_D = torch.randn(F, D, generator=g) * (0.3 + 2 * torch.rand(F, 1, generator=g)) / D**0.5
    hook = "blocks.3.hook_mlp_out"
    t = {"W_E": torch.randn(D, F, generator=g) / D**0.5, "b_E": 0.1 * torch.randn(F, generator=g),
         "W_D": W_D, "b_D": 0.1 * torch.randn(D, generator=g),
         "activation_function.log_jumprelu_threshold": (0.1 + torch.rand(F, generator=g)).log(),
         "dataset_average_activation_norm." + hook: torch.tensor(3.5)}
    folder = tmp_path / "lms"
    folder.mkdir()
    cfg = {"sae_type": "sae", "hook_point_in": hook, "hook_point_out": hook, "d_model": D, "d_sae": F,
           "expansion_factor": float(F // D),  # Llamascopium writes a float (4.0)
           "act_fn": "jumprelu", "norm_activation": "dataset-wise",
           "sparsity_include_decoder_norm": False, "top_k": 50, "jumprelu_threshold_window": 2.0,
           "some_future_field": [1, 2]}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(t, str(folder / "sae_weights.safetensors"))
    sae = SAE.from_pretrained(folder)
    assert sae.per_feature_threshold and sae.hyperparams.some_future_field == [1, 2]
    x = torch.randn(300, D) * 3
    f, y, _ = lms_forward(folder, x)
    assert torch.equal(sae.encode(x) > 0, f != 0) and int((f != 0).sum()) > 100
    assert rel(sae(x), y) < 1e-5
    out = convert(sae, "llamascopium", tmp_path / "again")  # written for decoder-norm gating
    f2, y2, _ = lms_forward(out, x)
    assert torch.equal(f2 != 0, f != 0) and rel(y2, y) < 1e-5
