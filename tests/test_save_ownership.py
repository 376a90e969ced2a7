"""Every save owns its folder: written whole in one step, nothing of an older SAE left to mix
in, nothing a user put there deleted (issue 16 item 1; issue 17 item 2)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from llamascope_sdk.base.atomic import write_folder
from llamascope_sdk.base.errors import FolderNotOwnedError
from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.loading.convert import convert
from llamascope_sdk.loading.sae import SAE
from tests.helpers import make_release, tiny_sae

F = 256


def _stats(seed: int) -> FeatureStats:
    g = torch.Generator().manual_seed(seed)
    return FeatureStats.from_sums(torch.rand(F, generator=g) * 10,
                                  torch.randint(1, 5, (F,), generator=g).float(), 100)


def _tree(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file, to compare a folder byte for byte."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_b_over_a_never_keeps_a_stats_or_labels(tmp_path) -> None:
    a, b = tiny_sae(seed=1), tiny_sae(seed=2)
    a.stats, a.labels = _stats(1), {3: "A's label"}
    folder = a.save_pretrained(tmp_path / "sae")
    assert SAE.from_pretrained(folder).labels == {3: "A's label"}
    b.save_pretrained(folder)  # B has no statistics and no labels
    got = SAE.from_pretrained(folder)
    assert got.stats is None and got.labels == {}
    assert sorted(_tree(folder)) == ["README.md", "checkpoints/final.safetensors",
                                     "hyperparams.json", "lm_config.json"]
    x = torch.randn(3, 64) * 4
    assert torch.allclose(got.encode(x), b.encode(x), atol=1e-5)
    assert not torch.allclose(got.encode(x), a.encode(x), atol=1e-3)
    b.stats, b.labels = _stats(2), {7: "B's label"}
    b.save_pretrained(folder)
    got = SAE.from_pretrained(folder)
    assert got.labels == {7: "B's label"}
    assert got.stats is not None and torch.equal(got.stats.typical, b.stats.typical)
    assert not torch.equal(got.stats.typical, _stats(1).typical)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary folder and the old one are gone


def test_convert_to_saelens_over_a_release_loads_the_new_sae(tmp_path) -> None:
    a, b = tiny_sae(seed=1), tiny_sae(seed=2)
    a.stats, a.labels = _stats(1), {3: "A's label"}
    folder = a.save_pretrained(tmp_path / "out")
    convert(b, "saelens", folder)
    assert sorted(_tree(folder)) == ["cfg.json", "sae_weights.safetensors"]
    got = SAE.from_pretrained(folder)
    x = torch.randn(3, 64) * 4
    assert torch.allclose(got.encode(x), b.encode(x), atol=1e-5)
    assert not torch.allclose(got.encode(x), a.encode(x), atol=1e-3)
    assert got.stats is None and got.labels == {}
    # and back: a release over the SAELens folder the SDK wrote
    convert(a, "release", folder)
    assert "cfg.json" not in _tree(folder)
    assert torch.allclose(SAE.from_pretrained(folder).encode(x), a.encode(x), atol=1e-5)


def test_a_folder_with_user_files_is_refused_and_left_intact(tmp_path) -> None:
    folder = tiny_sae(seed=1).save_pretrained(tmp_path / "sae")
    (folder / "notes.txt").write_text("mine")
    before = _tree(folder)
    with pytest.raises(FolderNotOwnedError, match=r"holds files that are no part of an SAE "
                                                  r"folder \(notes\.txt\)"):
        tiny_sae(seed=2).save_pretrained(folder)
    with pytest.raises(FolderNotOwnedError, match=r"notes\.txt"):
        convert(tiny_sae(seed=2), "saelens", folder)
    assert _tree(folder) == before


def test_a_release_the_sdk_did_not_write_is_refused(tmp_path) -> None:
    """A release written by another tool (no llamascope-sdk mark in its checkpoint) is a user's file."""
    src = make_release(tmp_path / "theirs")
    before = _tree(src)
    with pytest.raises(FolderNotOwnedError) as err:
        tiny_sae(seed=2).save_pretrained(src)
    assert str(err.value) == (f"{src} holds a release folder that llamascope-sdk did not write; a "
                              "save replaces only a new or empty folder or an SAE folder the SDK "
                              "wrote itself")
    assert _tree(src) == before
    web = tmp_path / "app"
    web.mkdir()
    (web / "manifest.json").write_text("{}")
    (web / "background.js").write_text("//")
    with pytest.raises(FolderNotOwnedError, match="background.js, manifest.json"):
        convert(tiny_sae(), "llamascopium", web)
    assert sorted(p.name for p in web.iterdir()) == ["background.js", "manifest.json"]
    file = tmp_path / "a_file"
    file.write_text("x")
    with pytest.raises(FolderNotOwnedError, match="is a file, not a folder"):
        tiny_sae().save_pretrained(file)
    assert file.read_text() == "x"


def test_empty_folder_is_used_and_a_crash_leaves_the_old_folder(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    tiny_sae().save_pretrained(empty)
    before = _tree(empty)

    def crash(tmp: Path) -> None:
        (tmp / "hyperparams.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        from llamascope_sdk.loading.formats import replaceable_sae_folder

        write_folder(empty, crash, replaceable=replaceable_sae_folder)
    assert _tree(empty) == before and sorted(os.listdir(tmp_path)) == ["empty"]


def test_without_an_atomic_exchange_the_two_renames_give_the_same_result(tmp_path, monkeypatch) -> None:
    import llamascope_sdk.base.atomic as atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # macOS, Windows
    a, b = tiny_sae(seed=1), tiny_sae(seed=2)
    a.labels = {3: "A's label"}
    folder = a.save_pretrained(tmp_path / "sae")
    b.save_pretrained(folder)
    assert SAE.from_pretrained(folder).labels == {}
    assert sorted(os.listdir(tmp_path)) == ["sae"]
