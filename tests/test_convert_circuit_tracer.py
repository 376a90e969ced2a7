"""circuit-tracer export. Its per-layer math is written out here by hand (no circuit_tracer
import): pre = x @ W_enc.T + b_enc; acts = pre * (pre > activation_function.threshold);
y^ = acts @ W_dec + b_dec, with x read at blocks.L.ln2.hook_normalized."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llamascope_sdk.loading.convert import convert
from llamascope_sdk.loading.formats import UnsupportedFormatError, detect_format
from llamascope_sdk.loading.sae import SAE
from tests.helpers import (
    make_release,
    raw_tensors,
    reference_decode,
    reference_encode,
    release_hyperparams,
)

D, F = 64, 256


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_transcoder_set_matches_reference(tmp_path) -> None:
    srcs = [make_release(tmp_path / f"L{i}TC", position="TC", layer=i, seed=i) for i in (2, 0, 1)]
    out = convert(",".join(str(s) for s in srcs), "circuit-tracer", tmp_path / "ct")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["model_name"] == "meta-llama/Llama-3.1-8B"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    assert cfg["transcoders"] == [str(out / f"layer_{i}.safetensors") for i in range(3)]
    assert detect_format(out) == "circuit-tracer"
    r = torch.randn(300, D) * 7
    x = r / torch.sqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5)
    for layer in range(3):
        hp = release_hyperparams(position="TC", layer=layer, d_model=D, d_sae=F)
        raw = raw_tensors(D, F, seed=layer)
        t = {k: v.double() for k, v in load_file(cfg["transcoders"][layer]).items()}
        assert t["W_enc"].shape == (F, D) and t["W_dec"].shape == (F, D)
        pre = x.double() @ t["W_enc"].T + t["b_enc"]
        acts = pre * (pre > t["activation_function.threshold"])
        f_ref = reference_encode(hp, raw, x)
        assert torch.equal(acts > 0, f_ref > 0)
        assert rel(acts, f_ref) < 1e-5
        assert rel(acts @ t["W_dec"] + t["b_dec"], reference_decode(hp, raw, f_ref)) < 1e-5
    with pytest.raises(UnsupportedFormatError, match="circuit-tracer transcoder set"):
        SAE.from_pretrained(out)


def test_hub_paths_and_refusals(tmp_path) -> None:
    tc = [make_release(tmp_path / f"L{i}TC", position="TC", layer=i) for i in range(2)]
    out = convert([str(p) for p in tc], "circuit-tracer", tmp_path / "ct", hub_repo="me/lxtc", dtype="bfloat16")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["transcoders"] == ["hf://me/lxtc/layer_0.safetensors", "hf://me/lxtc/layer_1.safetensors"]
    assert load_file(str(out / "layer_0.safetensors"))["W_enc"].dtype == torch.bfloat16
    with pytest.raises(UnsupportedFormatError, match="every layer"):
        convert(str(tc[1]), "circuit-tracer", tmp_path / "gap")
    r = make_release(tmp_path / "L0R", position="R", layer=0)
    with pytest.raises(UnsupportedFormatError, match="MLP transcoders"):
        convert(str(r), "circuit-tracer", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "gap").exists()


def test_lxtc_names_expand_to_32_layers() -> None:
    from llamascope_sdk.loading.convert import transcoder_set

    assert len(transcoder_set("LXTC-8x")) == 32
