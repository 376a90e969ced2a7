"""The 256-entry table and every spelling of a checkpoint name (no network)."""

from __future__ import annotations

import pytest

from llamascope_sdk.base.errors import UnknownSaeError
from llamascope_sdk.loading.registry import ALL_SAES, list_saes, resolve

SPELLINGS = [
    ("L12M-32x", (12, "M", 32)),
    ("L12M-128k", (12, "M", 32)),
    ("L12M-131k", (12, "M", 32)),
    ("L12M-8x", (12, "M", 8)),
    ("L12M-32k", (12, "M", 8)),
    ("l12m_32x", (12, "M", 32)),
    ("l15r_8x", (15, "R", 8)),
    ("l0a_32x", (0, "A", 32)),
    ("L31TC-8x", (31, "TC", 8)),
    ("l7tc-32x", (7, "TC", 32)),
    ("  L12m-128K ", (12, "M", 32)),
    ("llama3.1-8b/15-llamascope-res-32k", (15, "R", 8)),
    ("llama3.1-8b/13-llamascope-att-131k", (13, "A", 32)),
    ("llama3.1-8b/30-llamascope-mlp-32k", (30, "M", 8)),
    ("fnlp/Llama3_1-8B-Base-L12M-32x", (12, "M", 32)),
    ("OpenMOSS-Team/Llama3_1-8B-Base-L12M-32x", (12, "M", 32)),
    ("OpenMOSS-Team/Llama3_1-8B-Base-L8TC-8x", (8, "TC", 8)),
    ("OpenMOSS-Team/Llama3_1-8B-Base-LXM-32x:Llama3_1-8B-Base-L12M-32x", (12, "M", 32)),
    ("fnlp/Llama3_1-8B-Base-LXR-8x:Llama3_1Base-L21R-8x", (21, "R", 8)),
    ("Llama3_1-8B-Base-L12M-32x", (12, "M", 32)),
    ("Llama3_1Base-L30M-8x", (30, "M", 8)),
]


@pytest.mark.parametrize(("name", "want"), SPELLINGS)
def test_every_spelling_resolves(name: str, want: tuple[int, str, int]) -> None:
    ref = resolve(name)
    assert (ref.layer, ref.position, ref.expansion) == want


def test_list_saes_has_256_unique_entries() -> None:
    refs = list_saes()
    assert len(refs) == 256 == len(ALL_SAES)
    assert len({r.name for r in refs}) == 256
    assert len({r.repo_id() for r in refs}) == 8
    assert {r.d_sae for r in refs} == {32768, 131072}


def test_repo_ids_subfolders_and_hook_points() -> None:
    ref = resolve("L12M-128k")
    assert ref.repo_id() == "OpenMOSS-Team/Llama3_1-8B-Base-LXM-32x"
    assert ref.repo_id("fnlp") == "fnlp/Llama3_1-8B-Base-LXM-32x"
    assert ref.subfolder() == "Llama3_1-8B-Base-L12M-32x"
    assert ref.subfolder("Llama3_1Base-L{layer}{pos}-{exp}x") == "Llama3_1Base-L12M-32x"
    assert ref.hook_point_in == ref.hook_point_out == "blocks.12.hook_mlp_out"
    assert ref.d_sae == 131072 and ref.width == "128K"
    tc = resolve("L19TC-8x")
    assert tc.hook_point_in == "blocks.19.ln2.hook_normalized"
    assert tc.hook_point_out == "blocks.19.hook_mlp_out"
    assert tc.is_transcoder and tc.neuronpedia_id is None and tc.saelens_id is None
    r = resolve("L31R-8x")
    assert r.hook_point_in == "blocks.31.hook_resid_post" and r.d_sae == 32768 and r.width == "32K"
    assert resolve("L13A-32x").hook_point_in == "blocks.13.hook_attn_out"
    assert r.neuronpedia_id == "llama3.1-8b/31-llamascope-res-32k"
    assert r.saelens_id == ("llama_scope_lxr_8x", "l31r_8x")


@pytest.mark.parametrize("ref", ALL_SAES[::17], ids=lambda r: r.name)
def test_round_trips_through_every_printed_form(ref) -> None:
    forms = [ref.name, f"{ref.repo_id()}:{ref.subfolder()}", f"fnlp/{ref.subfolder()}"]
    if ref.neuronpedia_id:
        forms.append(ref.neuronpedia_id)
    if ref.saelens_id:
        forms.append(ref.saelens_id[1])
    assert all(resolve(f) == ref for f in forms)


def test_filters() -> None:
    assert len(list_saes(layer=12)) == 8
    assert len(list_saes(position="tc")) == 64
    assert len(list_saes(width="131k")) == 128 == len(list_saes(width=32)) == len(list_saes(width="32x"))
    assert len(list_saes(width="32k")) == 128 == len(list_saes(width=8))
    sel = list_saes(layer=3, position="A", width="8x")
    assert [r.name for r in sel] == ["L3A-8x"]
    with pytest.raises(UnknownSaeError, match="layer 32"):
        list_saes(layer=32)
    with pytest.raises(UnknownSaeError, match="position 'X'"):
        list_saes(position="X")
    with pytest.raises(UnknownSaeError, match="width '16x'"):
        list_saes(width="16x")


def test_unknown_name_lists_closest() -> None:
    with pytest.raises(UnknownSaeError, match="closest: ") as exc:
        resolve("L12MM-32x")
    assert "L12M-32x" in str(exc.value) and isinstance(exc.value, KeyError)
    with pytest.raises(UnknownSaeError, match="unknown width '33x': allowed are 8x"):
        resolve("L12M-33x")


def test_layer_32_is_out_of_range() -> None:
    with pytest.raises(UnknownSaeError, match="0-31"):
        resolve("L32R-8x")


def test_position_x_is_rejected() -> None:
    with pytest.raises(UnknownSaeError, match="R .*A .*M .*TC"):
        resolve("L12X-8x")


@pytest.mark.parametrize("name", [
    "OpenMOSS-Team/Llama3_1-8B-Base-LXM-32x:Llama3_1-8B-Base-L12R-32x",  # folder from another repo
    "llama3.1-8b/12-llamascope-tc-32k",  # Neuronpedia has no transcoders
    "gpt2/L12M-32x", "", "L12M",
])
def test_bad_names(name: str) -> None:
    with pytest.raises(UnknownSaeError):
        resolve(name)
