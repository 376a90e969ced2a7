"""The front door (llamascope_sdk.loading.locate): every name or path an SAE is given by becomes one
local folder and one format, detected once; Hub folders of any format come through the pinned,
verified download path (loopback fake Hub)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import (
    ChecksumMismatchError,
    SaeNotFoundError,
    UnknownSaeError,
)
from llamascope_sdk.loading.convert import convert
from llamascope_sdk.loading.formats import UnsupportedFormatError
from llamascope_sdk.loading.locate import locate

from .fakehub import fake_hub_fixture  # noqa: F401  (fixture)
from .test_convert_sparsify import sparsify_forward, write_sparsify

REPO = "EleutherAI/sae-llama-3-8b-32x"


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def sparsify_hub(fake_hub, tmp_path):
    """A sparsify repository with two hookpoint folders, and a transformers-model repository."""
    local = tmp_path / "local"
    t12 = write_sparsify(local / "layers.12", seed=0)
    write_sparsify(local / "layers.13", seed=1)
    files = {f"{d}/{n}": b for d in ("layers.12", "layers.13")
             for n, b in _folder_files(local / d).items()}
    files["README.md"] = b"# sparsify SAEs\n"
    commit = fake_hub.hub.commit(REPO, files)
    fake_hub.hub.commit("meta-llama/Some-Model", {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
        "model.safetensors": b"\0" * 4096})
    return fake_hub.hub, commit, t12, local


def test_hub_subfolder_of_a_foreign_format_loads_pinned_and_verified(sparsify_hub) -> None:
    hub, commit, t12, local = sparsify_hub
    sae = SAE.from_pretrained(f"{REPO}:layers.12")
    x = torch.randn(50, 64) * 2
    f_ref, y_ref = sparsify_forward(t12, x)
    assert torch.equal(sae.encode(x) > 0, f_ref > 0)
    assert torch.allclose(sae(x).double(), y_ref, atol=1e-4)
    assert sae.name == f"{REPO}:layers.12"
    assert sae.source.repo_id == REPO and sae.source.commit == commit and sae.source.verified
    want = hashlib.sha256((local / "layers.12" / "sae.safetensors").read_bytes()).hexdigest()
    assert sae.source.sha256["sae.safetensors"] == want
    got = sorted({r.path.split("/resolve/")[1] for r in hub.requests(method="GET") if "/resolve/" in r.path})
    assert got == [f"{commit}/layers.12/cfg.json", f"{commit}/layers.12/sae.safetensors"]
    # the other spellings name the same folder
    assert locate(f"{REPO}/layers.12").folder == locate(f"hf://{REPO}/layers.12").folder


def test_convert_reads_the_same_hub_folder(sparsify_hub, tmp_path) -> None:
    out = convert(f"{REPO}:layers.12", "release", tmp_path / "rel")
    again = SAE.from_pretrained(out)
    x = torch.randn(20, 64)
    assert torch.allclose(again.encode(x), SAE.from_pretrained(f"{REPO}:layers.12").encode(x), atol=1e-5)


def test_unreadable_hub_folders_get_one_line_before_any_weights(sparsify_hub) -> None:
    hub, _, _, _ = sparsify_hub
    with pytest.raises(UnsupportedFormatError) as err:
        SAE.from_pretrained(REPO)
    assert str(err.value) == (f"{REPO} is a sparsify checkpoint with 2 hookpoint folders "
                              "(layers.12, layers.13); one SAE is one of them")
    assert err.value.hint == (f"load {REPO}:layers.12, or `llamascope convert {REPO}:layers.12 "
                              "--to release OUT`")
    with pytest.raises(SaeNotFoundError, match=r"^meta-llama/Some-Model is not a checkpoint folder "
                                               r"this SDK can read \(found: config.json, model.safetensors\)"):
        SAE.from_pretrained("meta-llama/Some-Model")
    assert hub.requests(".safetensors", "GET") == []
    with pytest.raises(SaeNotFoundError, match="has no folder 'layers.99'"):
        SAE.from_pretrained(f"{REPO}:layers.99")


def test_a_tampered_hub_file_is_refused(sparsify_hub) -> None:
    hub, _, _, _ = sparsify_hub
    hub.tamper["layers.12/sae.safetensors"] = b"x" * 100
    with pytest.raises(ChecksumMismatchError, match="does not match the sha256"):
        SAE.from_pretrained(f"{REPO}:layers.12")


def test_names_that_are_nothing_get_one_line(tmp_path) -> None:
    with pytest.raises(UnknownSaeError, match="layer 40 is out of range"):
        locate("L40R-8x")
    with pytest.raises(UnknownSaeError, match="unknown Llama Scope SAE 'L12Q_8y!'"):
        locate("L12Q_8y!")
    with pytest.raises(SaeNotFoundError, match=r"^\./no/such/folder: no such folder$"):
        locate("./no/such/folder")


def test_local_formats_are_detected_once(tmp_path, monkeypatch) -> None:
    import llamascope_sdk.loading.locate as front

    write_sparsify(tmp_path / "ckpt" / "layers.12")
    calls = []
    real = front.detect
    monkeypatch.setattr(front, "detect", lambda *a: calls.append(a) or real(*a))
    sae = SAE.from_pretrained(tmp_path / "ckpt" / "layers.12")
    assert len(calls) == 1
    assert sae.name == str((tmp_path / "ckpt" / "layers.12").resolve())
    demo = locate("demo")
    assert (demo.format, demo.name) == ("release", "smollm2-135m-L15R-8x")
    with pytest.raises(UnsupportedFormatError, match=r"sparsify checkpoint with 1 hookpoint folders"):
        SAE.from_pretrained(tmp_path / "ckpt")


def test_check_name_refuses_without_a_request(tmp_path) -> None:
    """What the CLI asks before loading anything: names, folders and Hub ids pass, nonsense not."""
    from llamascope_sdk.loading.locate import check_name, hub_id

    for ok in ("L12R-8x", "l12r_8x", f"{REPO}:layers.12", f"hf://{REPO}/layers.12", str(tmp_path)):
        check_name(ok)
    assert hub_id(f"{REPO}/layers.12") == (REPO, "layers.12") == hub_id(f"{REPO}:layers.12")
    with pytest.raises(UnknownSaeError, match="layer 40 is out of range"):
        check_name("L40R-8x")
    with pytest.raises(SaeNotFoundError, match="no such folder"):
        check_name("~/no/such/sae")
    with pytest.raises(UnknownSaeError, match="unknown Llama Scope SAE 'what ever'"):
        check_name("what ever")


def test_an_unknown_source_format_is_named(tmp_path) -> None:
    with pytest.raises(UnsupportedFormatError) as err:
        convert("demo", "release", tmp_path / "out", fmt="gemma")
    assert str(err.value) == ("unknown source format 'gemma': allowed are release, saelens, "
                              "llamascopium, sparsify (or none, to detect it)")
    assert not (tmp_path / "out").exists()


def test_a_hub_folder_loads_offline_from_the_cache_after_one_online_load(sparsify_hub, monkeypatch) -> None:
    from .fakehub import set_offline

    hub, commit, _, _ = sparsify_hub
    online = SAE.from_pretrained(f"{REPO}:layers.12")
    hub.clear_log()
    set_offline(monkeypatch)
    offline = SAE.from_pretrained(f"{REPO}:layers.12")
    assert hub.log == [] and offline.source.commit == commit
    x = torch.randn(5, 64)
    assert torch.equal(offline.encode(x), online.encode(x))
    with pytest.raises(Exception, match="not in the local cache"):
        SAE.from_pretrained("someone/never-downloaded:sub")
