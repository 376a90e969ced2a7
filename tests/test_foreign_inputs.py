"""Foreign checkpoints that cannot be right are refused in one line naming the value, and the
folder is left byte for byte; good ones keep their base model and get a name of their own
(issue 17 items 4, 6, 7, 12)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import CorruptCheckpointError
from llamascope_sdk.loading.convert import convert
from tests.helpers import tiny_sae
from tests.test_convert_saelens import _cfg, _foreign, _write_saelens
from tests.test_convert_sparsify import write_sparsify

F = 256


def _tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _refused(folder: Path, message: str) -> None:
    before = _tree(folder)
    with pytest.raises(CorruptCheckpointError) as err:
        SAE.from_pretrained(folder)
    assert str(err.value) == message
    assert "looks like a bug" not in str(err.value)
    assert _tree(folder) == before


def test_saelens_nan_thresholds_are_refused(tmp_path) -> None:
    t = _foreign()
    t["threshold"][5] = float("nan")
    one = _write_saelens(tmp_path / "one", _cfg("jumprelu"), t)
    _refused(one, f"SAELens folder {one}: tensor 'threshold' holds NaN for 1 of {F} features "
                  "(first: feature 5); a NaN threshold is no threshold (the feature could never fire)")
    t = _foreign()
    t["threshold"][:] = float("nan")
    every = _write_saelens(tmp_path / "all", _cfg("jumprelu"), t)
    _refused(every, f"SAELens folder {every}: tensor 'threshold' holds NaN for {F} of {F} features "
                    "(first: feature 0); a NaN threshold is no threshold (the feature could never fire)")


def test_saelens_wrong_shapes_and_types_are_refused(tmp_path) -> None:
    t = _foreign()
    t["threshold"] = torch.rand(3)
    thr = _write_saelens(tmp_path / "thr", _cfg("jumprelu"), t)
    _refused(thr, f"SAELens folder {thr}: tensor 'threshold' has shape [3]; expected [{F}] (one "
                  "threshold per feature) or a scalar")
    t = _foreign()
    t["W_enc"] = t["W_enc"][None]
    w3 = _write_saelens(tmp_path / "w3", _cfg("jumprelu"), t)
    _refused(w3, f"SAELens folder {w3}: tensor 'W_enc' has shape [1, 64, {F}] and dtype float32; "
                 "expected a 2-D floating-point matrix [d_in, d_sae]")
    cfg = _cfg("jumprelu")
    cfg["metadata"] = "blocks.7.hook_resid_post"
    meta = _write_saelens(tmp_path / "meta", cfg, _foreign())
    _refused(meta, f"SAELens folder {meta}: cfg.json 'metadata' is a str ('blocks.7.hook_resid_post'); "
                   "expected a JSON object (hook_name, model_name, ...)")


def test_llamascopium_threshold_of_the_wrong_length_is_refused(tmp_path) -> None:
    out = convert(tiny_sae(), "llamascopium", tmp_path / "lms")
    w = load_file(str(out / "sae_weights.safetensors"))
    w["activation_function.log_jumprelu_threshold"] = torch.zeros(5)
    save_file(w, str(out / "sae_weights.safetensors"))
    _refused(out, f"Llamascopium folder {out}: tensor 'activation_function.log_jumprelu_threshold' "
                  f"has shape [5]; expected [{F}] (one threshold per feature) or a scalar")


def test_saelens_import_keeps_its_base_model(tmp_path) -> None:
    """The demo through SAELens and back still names SmolLM2 (not Llama-3.1-8B) at width 576."""
    from llamascope_sdk.loading.models import base_model_of

    demo = SAE.from_pretrained("demo")
    back = SAE.from_pretrained(convert("demo", "saelens", tmp_path / "sl"))
    assert base_model_of(back) == base_model_of(demo) == "smollm2-135m"
    again = SAE.from_pretrained(convert(back, "release", tmp_path / "rel"))
    assert base_model_of(again) == "smollm2-135m" and again.d_model == 576
    cfg = _cfg("jumprelu")
    cfg["metadata"]["model_name"] = "gpt2"
    assert base_model_of(SAE.from_pretrained(_write_saelens(tmp_path / "g", cfg, _foreign()))) == "gpt2"


def test_foreign_saes_get_distinct_stable_names(tmp_path) -> None:
    a = _write_saelens(tmp_path / "a" / "sae", _cfg("jumprelu"), _foreign(0))
    b = _write_saelens(tmp_path / "b" / "sae", _cfg("jumprelu"), _foreign(1))
    write_sparsify(tmp_path / "c" / "layers.12")
    write_sparsify(tmp_path / "d" / "layers.12", seed=1)
    names = [SAE.from_pretrained(p).name for p in
             (a, b, tmp_path / "c" / "layers.12", tmp_path / "d" / "layers.12")]
    assert len(set(names)) == 4 and "sae" not in names
    assert names[0] == str(a.resolve())
    assert SAE.from_pretrained(a).name == names[0]  # stable: the same folder, the same name


def test_a_saved_import_gets_the_template_card_with_its_base_model(tmp_path) -> None:
    from huggingface_hub import ModelCard

    cfg = _cfg("jumprelu")
    cfg["metadata"]["model_name"] = "gpt2"
    sae = SAE.from_pretrained(_write_saelens(tmp_path / "g", cfg, _foreign()))
    card = ModelCard((sae.save_pretrained(tmp_path / "rel") / "README.md").read_text())
    assert card.data.base_model == "gpt2" and card.data.library_name == "llamascope-sdk"
    assert "llamascope" in card.data.tags and "jumprelu" in card.data.tags
    assert "Converted from a saelens checkpoint." in card.text
    assert "blocks.7.hook_resid_post" in card.text
