"""The folded SAE against spec 3.2 written out plainly (tests/helpers.py), for R, A, M and TC."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk import SAE

from .helpers import (
    make_release,
    raw_tensors,
    reference_decode,
    reference_encode,
    reference_forward_training_space,
    release_hyperparams,
)

POSITIONS = ["R", "A", "M", "TC"]


def _setup(position: str, seed: int = 0):
    hp = release_hyperparams(position=position, d_model=64, d_sae=256, threshold=0.25,
                             norm_in=62.0 if position == "TC" else 8.0625)
    raw = raw_tensors(64, 256, seed)
    n_in = hp["dataset_average_activation_norm"]["in"]
    x = torch.randn(5, 7, 64) * n_in / 8  # raw activations with ||x|| ~ n_in
    return hp, raw, x


@pytest.mark.parametrize("position", POSITIONS)
def test_decoder_columns_are_not_unit_norm_in_fixture(position: str) -> None:
    _, raw, _ = _setup(position)
    norms = raw["decoder.weight"].float().norm(dim=0)
    assert norms.min() < 0.6 and norms.max() > 2.0


@pytest.mark.parametrize("position", POSITIONS)
def test_encode_decode_forward_match_spec_fp32(position: str) -> None:
    hp, raw, x = _setup(position)
    sae = SAE.from_raw(hp, raw)
    f = sae.encode(x)
    ref_f = reference_encode(hp, raw, x)
    assert f.dtype == torch.float32 and f.shape == (5, 7, 256)
    # The firing sets agree except for values within rounding of the threshold.
    near = (ref_f.abs() - hp["jump_relu_threshold"]).abs() < 1e-4
    mismatch = ((f > 0) != (ref_f > 0)) & ~near
    assert not mismatch.any()
    torch.testing.assert_close(f.double()[~near], ref_f[~near], rtol=1e-5, atol=1e-5)
    l0 = (f > 0).sum(-1).float().mean()
    assert 5 < l0 < 250  # the fixture gives a non-trivial sparsity
    torch.testing.assert_close(sae.decode(f).double(), reference_decode(hp, raw, f), rtol=1e-5, atol=1e-5)
    y = sae(x).double()
    torch.testing.assert_close(y, reference_forward_training_space(hp, raw, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("position", POSITIONS)
def test_bf16_within_stated_tolerance(position: str) -> None:
    """bf16 inference: folding in fp32 then casting. Tolerance: bf16 has 8 mantissa bits, so
    |err| <= ~1% of the activation scale; firing may flip only near the threshold."""
    hp, raw, x = _setup(position)
    sae = SAE.from_raw(hp, raw, dtype=torch.bfloat16)
    assert sae.W_enc.dtype == torch.bfloat16
    f = sae.encode(x).double()
    ref_f = reference_encode(hp, raw, x)
    scale = ref_f.abs().max()
    near = (ref_f.abs() - hp["jump_relu_threshold"]).abs() < 0.02 * scale
    assert not (((f > 0) != (ref_f > 0)) & ~near).any()
    assert (f - ref_f)[~near].abs().max() <= 0.02 * scale
    y_err = (sae(x).double() - reference_forward_training_space(hp, raw, x)).abs().max()
    assert y_err <= 0.03 * x.abs().max()


def test_transcoder_uses_separate_factors() -> None:
    """Merging s_in and s_out (a common third-party bug) must change the answer for TC."""
    hp, raw, x = _setup("TC")
    sae = SAE.from_raw(hp, raw)
    assert sae.is_transcoder
    wrong = dict(hp, dataset_average_activation_norm={"in": 62.0, "out": 62.0})
    assert not torch.allclose(SAE.from_raw(wrong, raw).encode(x), sae.encode(x))


def test_threshold_is_strict() -> None:
    hp, raw, x = _setup("R")
    sae = SAE.from_raw(hp, raw)
    a = sae.pre_acts(x)
    sae.threshold.fill_(float(a.flatten()[3]))
    f = sae.encode(x)
    assert f.flatten()[3] == 0


def test_unit_decoder_and_feature_units() -> None:
    """Decoder rows are unit vectors, so f_i is the length of the contribution f_i d_i."""
    hp, raw, x = _setup("M")
    sae = SAE.from_raw(hp, raw)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(256), rtol=1e-5, atol=1e-5)


def test_encode_topk_ranks_by_decoder_weighted_relu() -> None:
    hp, raw, x = _setup("R")
    sae = SAE.from_raw(hp, raw)
    k = 10
    got = sae.encode_topk(x, k)
    # plainly: h in training space, key = relu(h) * ||d_i||, value = key / s_out (model units)
    import math
    s_in = math.sqrt(64) / hp["dataset_average_activation_norm"]["in"]
    s_out = s_in
    h = (s_in * x.double()) @ raw["encoder.weight"].double().T + raw["encoder.bias"].double()
    key = h.clamp(min=0) * raw["decoder.weight"].double().norm(dim=0)
    top = key.topk(k, dim=-1)
    ref = torch.zeros_like(key).scatter_(-1, top.indices, top.values / s_out)
    assert ((got > 0).sum(-1) == k).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_encode_features_subset_matches_full() -> None:
    hp, raw, x = _setup("R")
    sae = SAE.from_raw(hp, raw)
    idx = [3, 17, 255]
    torch.testing.assert_close(sae.encode_features(x, idx), sae.encode(x)[..., idx])


def test_sparse_and_dense_decode_agree() -> None:
    hp, raw, x = _setup("R")
    sae = SAE.from_raw(hp, raw)
    f = sae.encode(x)
    dense = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(sae.decode(f), dense, rtol=1e-5, atol=1e-5)
    f_full = torch.rand(3, 256)  # dense input takes the dense path
    torch.testing.assert_close(sae.decode(f_full), f_full @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("position", POSITIONS)
def test_save_load_round_trip_is_exact(tmp_path, position: str) -> None:
    src = make_release(tmp_path / "src", position=position)
    sae = SAE.from_pretrained(src)
    x = torch.randn(4, 64) * 2
    sae.save_pretrained(tmp_path / "out")
    for f in ("hyperparams.json", "lm_config.json", "checkpoints/final.safetensors"):
        assert (tmp_path / "out" / f).is_file()
    again = SAE.from_pretrained(tmp_path / "out")
    assert torch.equal(sae.encode(x), again.encode(x))
    # the file holds the original unfolded bf16 tensors, bit for bit
    from safetensors.torch import load_file
    a, b = load_file(src / "checkpoints/final.safetensors"), load_file(tmp_path / "out/checkpoints/final.safetensors")
    for k in a:
        assert b[k].dtype == torch.bfloat16
        assert torch.equal(a[k], b[k]), k
    import json
    assert json.loads((tmp_path / "out/hyperparams.json").read_text()) == json.loads((src / "hyperparams.json").read_text())


def test_standalone_no_model_needed() -> None:
    hp, raw, x = _setup("A")
    sae = SAE.from_raw(hp, raw)
    assert sae(x).shape == x.shape


def test_push_to_hub_uploads_the_release_layout_in_one_commit(tmp_path, monkeypatch) -> None:
    """push_to_hub saves the release layout and hands it to huggingface_hub in one upload."""
    from huggingface_hub import HfApi

    calls: dict = {}

    def fake_create_repo(self, repo_id, **kw):
        calls["create"] = (repo_id, kw)

    def fake_upload_folder(self, *, repo_id, folder_path, path_in_repo, revision, commit_message):
        import shutil

        calls["upload"] = (repo_id, path_in_repo, revision, commit_message)
        shutil.copytree(folder_path, tmp_path / "uploaded")  # what would reach the Hub
        return "https://huggingface.co/me/my-saes/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    sae = SAE.from_pretrained(make_release(tmp_path / "src", position="TC"))
    url = sae.push_to_hub("me/my-saes", subfolder="L12TC-tiny", private=True)
    assert url.endswith("/commit/abc")
    assert calls["create"] == ("me/my-saes", {"private": True, "exist_ok": True})
    assert calls["upload"][:2] == ("me/my-saes", "L12TC-tiny")
    again = SAE.from_pretrained(tmp_path / "uploaded")
    x = torch.randn(3, 64)
    assert torch.equal(again.encode(x), sae.encode(x))


def test_saved_files_are_readable_by_others(tmp_path) -> None:
    """Atomic writes go through mkstemp (0600); the published files get the umask's mode."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        SAE.from_pretrained(make_release(tmp_path / "src")).save_pretrained(tmp_path / "out")
    finally:
        os.umask(old)
    for rel in ("", "checkpoints", "hyperparams.json", "checkpoints/final.safetensors"):
        mode = stat.S_IMODE((tmp_path / "out" / rel).stat().st_mode)
        assert mode == (0o755 if (tmp_path / "out" / rel).is_dir() else 0o644), (rel, oct(mode))


@pytest.mark.parametrize("position", ["R", "TC"])
def test_saelens_gate_is_spec_3_4_and_differs_from_the_reference(position: str) -> None:
    """Spec 7.1 is UNCERTAIN about which gate real checkpoints need; both are available.
    gate="saelens" fires iff h_i > theta * s_in (SAELens, spec 3.4), written out plainly here."""
    import math

    hp, raw, x = _setup(position)
    ref = SAE.from_raw(hp, raw)
    sl = SAE.from_raw(hp, raw, gate="saelens")
    s_in = math.sqrt(64) / hp["dataset_average_activation_norm"]["in"]
    h = (s_in * x.double()) @ raw["encoder.weight"].double().T + raw["encoder.bias"].double()
    want_mask = h > hp["jump_relu_threshold"] * s_in
    got = sl.encode(x)
    near = (h - hp["jump_relu_threshold"] * s_in).abs() < 1e-4
    assert not (((got > 0) != want_mask) & ~near).any()
    # values stay in model units: where both fire, the two gates give the same number
    both = (got > 0) & (ref.encode(x) > 0)
    torch.testing.assert_close(got[both], ref.encode(x)[both])
    assert ((got > 0) != (ref.encode(x) > 0)).float().mean() > 0.01  # ||d_i|| != 1 here
    idx = [0, 5, 77]
    torch.testing.assert_close(sl.encode_features(x, idx), got[..., idx])


def test_gates_agree_when_decoder_columns_are_unit_norm() -> None:
    hp, raw, x = _setup("R")
    raw = dict(raw)
    dec = raw["decoder.weight"].float()
    raw["decoder.weight"] = (dec / dec.norm(dim=0)).to(torch.bfloat16)
    ref = SAE.from_raw(hp, raw)
    a, b = ref.encode(x), SAE.from_raw(hp, raw, gate="saelens").encode(x)
    near = (ref.pre_acts(x) - hp["jump_relu_threshold"]).abs() < 1e-2  # bf16 norms: 1 +- 0.4%
    assert near.float().mean() < 0.05
    assert torch.equal((a > 0)[~near], (b > 0)[~near])


def test_unknown_gate_is_rejected() -> None:
    hp, raw, _ = _setup("R")
    with pytest.raises(ValueError, match="unknown gate 'topk': allowed are reference, saelens"):
        SAE.from_raw(hp, raw, gate="topk")
