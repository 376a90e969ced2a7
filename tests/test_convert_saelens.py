"""SAELens export/import. SAELens's math is written out here by hand (no sae_lens import):

    pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc          W_enc [d_in, d_sae]
    jumprelu: f = relu(pre) * (pre > threshold)
    topk    : k largest of pre (or of pre * ||W_dec_i|| with rescale_acts_by_decoder_norm), relu
    standard: f = relu(pre)
    x^  = f @ W_dec + b_dec      (f / ||W_dec_i|| first with rescale_acts_by_decoder_norm)
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamascope_sdk.loading.convert import convert
from llamascope_sdk.loading.formats import UnsupportedFormatError
from llamascope_sdk.loading.sae import SAE
from tests.helpers import (
    make_release,
    raw_tensors,
    reference_decode,
    reference_encode,
    release_hyperparams,
)

D, F = 64, 256


def saelens_forward(folder, x):
    cfg = json.loads((folder / "cfg.json").read_text())
    t = {k: v.double() for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    x = x.double()
    sae_in = x - t["b_dec"] * cfg.get("apply_b_dec_to_input", False)
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    norms = t["W_dec"].norm(dim=1)
    arch = cfg["architecture"]
    if arch.startswith("jumprelu"):
        f = torch.relu(pre) * (pre > t["threshold"])
    elif arch == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * norms
        vals, idx = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        f = torch.relu(pre)
    fd = f / norms if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm") else f
    return f, fd @ t["W_dec"] + t["b_dec"]


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("position", ["R", "M", "TC"])
def test_export_matches_reference_math(tmp_path, position) -> None:
    """Exported folder, computed by hand as SAELens does, fires the reference's features with the
    reference's values (model units) and reconstructions; decoder norms of the source ~0.3..3."""
    hp = release_hyperparams(position=position, d_model=D, d_sae=F)
    raw = raw_tensors(D, F)
    src = make_release(tmp_path / "src", position=position, d_model=D, d_sae=F)
    out = convert(src, "saelens", tmp_path / "sl")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is False
    assert cfg["architecture"] == ("jumprelu_transcoder" if position == "TC" else "jumprelu")
    # A 6.x version keeps metadata (SAELens 6.54 rebuilds it from top-level keys otherwise).
    assert cfg["sae_lens_version"].startswith("6.")
    if position == "TC":
        assert cfg["metadata"]["hook_name_out"] == hp["hook_point_out"]
    assert cfg["metadata"]["hook_name"] == hp["hook_point_in"]
    if position == "TC":
        assert cfg["d_out"] == D and cfg["metadata"]["hook_name_out"] == hp["hook_point_out"]
    x = torch.randn(400, D) * 4
    f_sl, y_sl = saelens_forward(out, x)
    f_ref = reference_encode(hp, raw, x)
    assert torch.equal(f_sl > 0, f_ref > 0)
    assert rel(f_sl, f_ref) < 1e-5
    assert rel(y_sl, reference_decode(hp, raw, f_ref)) < 1e-5
    t = load_file(str(out / "sae_weights.safetensors"))
    assert torch.allclose(t["W_dec"].norm(dim=1), torch.ones(F), atol=1e-5)  # unit rows
    assert torch.all(t["threshold"] == hp["jump_relu_threshold"])
    back = SAE.from_pretrained(out)  # detected as SAELens
    sae = SAE.from_pretrained(src)
    assert torch.equal(back.encode(x) > 0, sae.encode(x) > 0)
    assert rel(back.encode(x), sae.encode(x)) < 1e-5 and rel(back(x), sae(x)) < 1e-5


def _write_saelens(folder, cfg, tensors):
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def _foreign(seed=0):
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(F, D, generator=g) / D**0.5 * (0.2 + 3 * torch.rand(F, 1, generator=g))
    return {"W_enc": torch.randn(D, F, generator=g) / D**0.5, "b_enc": 0.1 * torch.randn(F, generator=g),
            "W_dec": W_dec, "b_dec": 0.1 * torch.randn(D, generator=g),
            "threshold": 0.05 + 0.5 * torch.rand(F, generator=g)}


def _cfg(arch, **kw):
    return {"architecture": arch, "d_in": D, "d_sae": F, "dtype": "float32", "apply_b_dec_to_input": False,
            "normalize_activations": "none", "metadata": {"hook_name": "blocks.7.hook_resid_post"}, **kw}


def test_import_jumprelu_per_feature_threshold(tmp_path) -> None:
    """A SAELens JumpReLU SAE with per-feature thresholds and decoder norms 0.2..3.2: the same
    features fire; our value = SAELens value * ||W_dec_i||; reconstructions equal."""
    t = _foreign()
    folder = _write_saelens(tmp_path / "sl", _cfg("jumprelu", apply_b_dec_to_input=True), t)
    sae = SAE.from_pretrained(folder)
    assert sae.per_feature_threshold and sae.hyperparams.hook_point_in == "blocks.7.hook_resid_post"
    x = torch.randn(500, D) * 2
    f_sl, y_sl = saelens_forward(folder, x)
    f = sae.encode(x)
    assert torch.equal(f > 0, f_sl > 0) and int((f > 0).sum()) > 100
    assert rel(f, f_sl * t["W_dec"].norm(dim=1).double()) < 1e-5
    assert rel(sae.decode(f), y_sl) < 1e-5
    # and back out: the re-exported folder computes the same
    out = convert(sae, "saelens", tmp_path / "again")
    f2, y2 = saelens_forward(out, x)
    assert torch.equal(f2 > 0, f_sl > 0) and rel(y2, y_sl) < 1e-5
    # lossless through the release layout too (per-feature threshold kept as a tensor)
    again = SAE.from_pretrained(sae.save_pretrained(tmp_path / "rel"))
    assert again.per_feature_threshold and torch.equal(again.encode(x) > 0, f > 0)


@pytest.mark.parametrize("rescale", [False, True])
def test_import_topk(tmp_path, rescale) -> None:
    t = _foreign(1)
    del t["threshold"]
    folder = _write_saelens(tmp_path / "sl", _cfg("topk", k=12, rescale_acts_by_decoder_norm=rescale), t)
    sae = SAE.from_pretrained(folder)
    x = torch.randn(300, D)
    f_sl, y_sl = saelens_forward(folder, x)
    f = sae.encode(x)
    assert torch.equal(f > 0, f_sl > 0)
    want = f_sl if rescale else f_sl * t["W_dec"].norm(dim=1).double()
    assert rel(f, want) < 1e-5 and rel(sae.decode(f), y_sl) < 1e-5
    out = convert(sae, "saelens", tmp_path / "again")  # Top-K export keeps SAELens's ranking
    f2, y2 = saelens_forward(out, x)
    assert torch.equal(f2 > 0, f_sl > 0) and rel(y2, y_sl) < 1e-5


def test_import_standard_relu_with_b_dec_subtracted(tmp_path) -> None:
    t = _foreign(2)
    del t["threshold"]
    folder = _write_saelens(tmp_path / "sl", _cfg("standard", apply_b_dec_to_input=True), t)
    sae = SAE.from_pretrained(folder)
    x = torch.randn(200, D)
    f_sl, y_sl = saelens_forward(folder, x)
    assert torch.equal(sae.encode(x) > 0, f_sl > 0) and rel(sae(x), y_sl) < 1e-5


def test_refusals_name_the_reason(tmp_path) -> None:
    t = _foreign()
    bad = _write_saelens(tmp_path / "ln", _cfg("jumprelu", normalize_activations="layer_norm"), t)
    with pytest.raises(UnsupportedFormatError, match="layer_norm"):
        SAE.from_pretrained(bad)
    gated = _write_saelens(tmp_path / "gated", _cfg("gated"), t)
    with pytest.raises(UnsupportedFormatError, match="gated"):
        SAE.from_pretrained(gated)
    avg = _write_saelens(tmp_path / "avg", _cfg("jumprelu", normalize_activations="expected_average_only_in"), t)
    with pytest.raises(UnsupportedFormatError, match="norm_scaling_factor"):
        SAE.from_pretrained(avg)
    from llamascope_sdk.loading.convert import load

    assert load(avg, norm_scaling_factor=2.0).d_sae == F


def test_bf16_round_trip(tmp_path) -> None:
    """bf16 SAE -> SAELens -> back, all bf16: masks agree except within bf16 rounding of the
    threshold; reconstructions within 2e-2 relative (stated bf16 tolerance)."""
    src = make_release(tmp_path / "src")
    sae = SAE.from_pretrained(src, dtype="bfloat16")
    back = SAE.from_pretrained(convert(src, "saelens", tmp_path / "sl"), dtype="bfloat16")
    x = torch.randn(200, D) * 4
    a, b = sae.encode(x), back.encode(x)
    assert float(((a > 0) != (b > 0)).float().mean()) < 1e-3
    assert rel(back(x), sae(x)) < 2e-2


def test_cli_convert(tmp_path) -> None:
    from typer.testing import CliRunner

    from llamascope_sdk.cli import app

    src = make_release(tmp_path / "src")
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "sl"), "--to", "saelens", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["out"] == str(tmp_path / "sl")
    res = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "x"), "--to", "nope"])
    assert res.exit_code == 1 and "unknown target format" in res.output
