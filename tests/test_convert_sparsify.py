"""sparsify import. Its math is written out here by hand (no sparsify import):

    x'  = x - b_dec (autoencoders only)
    pre = relu(x' @ encoder.weight.T + encoder.bias);  top-k of pre
    y^  = sum_top value * W_dec[index] + b_dec
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llamascope_sdk.loading.convert import convert
from llamascope_sdk.loading.formats import UnsupportedFormatError, detect_format
from llamascope_sdk.loading.sae import SAE

D, F, K = 64, 256, 16


def write_sparsify(folder, *, transcode=False, skip=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"encoder.weight": torch.randn(F, D, generator=g) / D**0.5,
         "encoder.bias": 0.1 * torch.randn(F, generator=g),
         "W_dec": torch.randn(F, D, generator=g) * (0.2 + 2 * torch.rand(F, 1, generator=g)) / D**0.5,
         "b_dec": 0.3 * torch.randn(D, generator=g)}
    if skip:
        t["W_skip"] = torch.zeros(D, D)
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(
        {"d_in": D, "num_latents": F, "k": K, "expansion_factor": 4, "normalize_decoder": True,
         "multi_topk": False, "skip_connection": skip, "transcode": transcode, "activation": "topk"}))
    save_file(t, str(folder / "sae.safetensors"))
    return t


def sparsify_forward(t, x, transcode=False):
    t = {k: v.double() for k, v in t.items()}
    x = x.double()
    xin = x if transcode else x - t["b_dec"]
    pre = torch.relu(xin @ t["encoder.weight"].T + t["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, vals)
    return f, f @ t["W_dec"] + t["b_dec"]


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_import_topk_sae_exact(tmp_path) -> None:
    t = write_sparsify(tmp_path / "ckpt" / "layers.12")
    assert detect_format(tmp_path / "ckpt") == "sparsify-root"
    sae = SAE.from_pretrained(tmp_path / "ckpt" / "layers.12")
    assert sae.hyperparams.hook_point_in == "blocks.12.hook_resid_post"
    assert sae.hyperparams.act_fn == "topk" and sae.hyperparams.top_k == K
    x = torch.randn(300, D) * 2
    f_sp, y_sp = sparsify_forward(t, x)
    f = sae.encode(x)
    assert torch.equal(f > 0, f_sp > 0)
    assert rel(f, f_sp * t["W_dec"].norm(dim=1).double()) < 1e-5  # our value = theirs * ||W_dec_i||
    assert rel(sae(x), y_sp) < 1e-5
    # lossless through the release layout
    again = SAE.from_pretrained(convert(tmp_path / "ckpt" / "layers.12", "release", tmp_path / "rel"))
    assert torch.equal(again.encode(x) > 0, f > 0) and rel(again(x), y_sp) < 1e-5


def test_mlp_transcoder_needs_and_folds_the_rmsnorm_gain(tmp_path) -> None:
    folder = tmp_path / "layers.5.mlp"
    t = write_sparsify(folder, transcode=True, seed=1)
    with pytest.raises(UnsupportedFormatError, match="gain"):
        SAE.from_pretrained(folder)
    gain = 0.5 + torch.rand(D)
    from llamascope_sdk.loading.convert import load

    sae = load(folder, rmsnorm_gain=gain)
    assert (sae.hyperparams.hook_point_in, sae.hyperparams.hook_point_out) == (
        "blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out")
    r = torch.randn(200, D) * 5
    normed = r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5)  # ln2.hook_normalized
    f_sp, y_sp = sparsify_forward(t, normed * gain, transcode=True)  # sparsify sees g * n(r)
    assert torch.equal(sae.encode(normed) > 0, f_sp > 0)
    assert rel(sae(normed), y_sp) < 1e-5


def test_refusals(tmp_path) -> None:
    write_sparsify(tmp_path / "layers.3", skip=True)
    with pytest.raises(UnsupportedFormatError, match="W_skip"):
        SAE.from_pretrained(tmp_path / "layers.3")
    write_sparsify(tmp_path / "root" / "layers.1")
    with pytest.raises(UnsupportedFormatError, match="hookpoint") as exc:
        SAE.from_pretrained(tmp_path / "root")
    assert "llamascope convert" in exc.value.hint
    write_sparsify(tmp_path / "weird")
    with pytest.raises(UnsupportedFormatError, match="hook point"):
        SAE.from_pretrained(tmp_path / "weird")
    from llamascope_sdk.loading.convert import load

    assert load(tmp_path / "weird", hook_point="blocks.9.hook_mlp_out").hyperparams.hook_point_in == \
        "blocks.9.hook_mlp_out"
