"""The feature store round-trips without the model and refuses half-written folders."""

from __future__ import annotations

import json

import pytest
import torch

from llamascope_sdk.base.errors import (
    CorruptCheckpointError,
    FolderNotOwnedError,
    OutputPathError,
    StoreMismatchError,
)
from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.mining.mine import mine
from llamascope_sdk.store import view
from llamascope_sdk.store.feature_store import (
    MANIFEST,
    FeatureStore,
    IncompleteStoreError,
    load_store,
)

from .conftest import CharTokenizer
from .test_hooks import synthetic_sae
from .test_mining import DOCS


@pytest.fixture(scope="module")
def mined(tiny_llama):
    torch.manual_seed(0)
    ids = torch.randint(3, 99, (2, 24))
    ids[:, 0] = 1
    sae = synthetic_sae(tiny_llama, ids, 1, "M", d_sae=96, l0=12)
    sae.labels = {3: "a label"}
    res = mine(tiny_llama, CharTokenizer(), sae, DOCS, tokens=300, context=40, batch_size=4, top_n=4,
               n_samples=4, window_before=3, window_after=2, progress=False)[sae.name]
    return sae, res


def test_round_trip_without_model(mined, tiny_llama, tmp_path):
    sae, res = mined
    store = FeatureStore.from_result(res, CharTokenizer(), model=tiny_llama, sae_spec="my-sae",
                                     corpus="docs")
    store.save(tmp_path / "store")
    back = FeatureStore.load(tmp_path / "store")
    for a, b in ((store.top, back.top), (store.samples, back.samples)):
        for key in ("values", "doc", "pos", "tokens", "acts"):
            assert torch.equal(getattr(a, key).long() if key == "tokens" else getattr(a, key),
                               getattr(b, key)), key
    assert torch.equal(back.hist, res.hist)
    assert torch.equal(back.stats.typical, res.stats.typical)
    assert torch.equal(back.lens.top_ids, store.lens.top_ids)
    assert back.labels == {3: "a label"}
    i = int(res.stats.frequency.argmax())
    f = view.feature(back, i)
    assert f["top_examples"][0]["max"] == float(res.top.values[i, 0])
    ex = f["top_examples"][0]
    assert ex["acts"][ex["max_index"]] == pytest.approx(ex["max"])
    assert (ex["doc"], ex["pos"]) == (int(res.top.doc[i, 0]), int(res.top.pos[i, 0]))
    assert len(ex["tokens"]) == len(ex["acts"]) == len(ex["token_ids"])
    json.dumps(f, allow_nan=False)
    # The statistics are the file relative steering reads.
    sae.stats = FeatureStats.load(tmp_path / "store")
    assert torch.equal(sae.stats.frequency, res.stats.frequency)
    assert load_store(tmp_path / "store").name == store.name


def test_half_written_store_is_refused(mined, tmp_path):
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    folder = store.save(tmp_path / "s")
    (folder / MANIFEST).unlink()  # as if killed before the manifest
    with pytest.raises(IncompleteStoreError, match="not a complete feature store"):
        FeatureStore.load(folder)
    m = tmp_path / "s2"
    store.save(m)
    data = json.loads((m / MANIFEST).read_text())
    (m / MANIFEST).write_text(json.dumps({**data, "complete": False}))
    with pytest.raises(IncompleteStoreError):
        FeatureStore.load(m)


def test_interrupted_save_leaves_the_old_store(mined, tmp_path):
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    folder = store.save(tmp_path / "s")

    def boom(_st, _tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.save(folder, extra=boom)
    assert FeatureStore.load(folder).d_sae == store.d_sae
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folder left
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(FolderNotOwnedError, match="is not a feature store"):
        store.save(tmp_path / "other")


def test_cli_show_json_and_text(mined, tmp_path):
    from typer.testing import CliRunner

    from llamascope_sdk.cli import app

    _, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer(), sae_spec="my-sae").save(tmp_path / "st")
    i = int(res.stats.frequency.argmax())
    out = CliRunner().invoke(app, ["show", str(folder), str(i), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    ex = data["top_examples"][0]
    assert {"tokens", "acts", "max", "doc", "pos", "max_index"} <= set(ex)
    assert data["steer"].startswith("llamascope steer --sae my-sae -f ")
    text = CliRunner().invoke(app, ["show", str(folder), str(i)])
    assert text.exit_code == 0 and "[[" in text.stdout
    (folder / MANIFEST).unlink()
    bad = CliRunner().invoke(app, ["show", str(folder), str(i)])
    assert bad.exit_code == 1 and "not a complete feature store" in bad.output


# --------------------------------------------------------------------------- issue 17 cases
def _tree(folder):
    """Every file under ``folder`` with its bytes (to assert a folder is intact byte for byte)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_save_refuses_a_folder_it_did_not_write(mined, tmp_path):
    """Issue 17 case 1: a web-app folder holding a manifest.json is not a store: refused, intact."""
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    app = tmp_path / "webapp"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "ext", "manifest_version": 3}')
    (app / "background.js").write_text("chrome.runtime.onInstalled.addListener(() => {});\n")
    before = _tree(app)
    with pytest.raises(FolderNotOwnedError) as err:
        store.save(app)
    assert str(err.value) == (f"{app} is not a feature store (2 entries, e.g. background.js, "
                              "manifest.json): only an empty folder or an earlier feature store "
                              "is replaced")
    assert _tree(app) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"]  # no temporary left
    # A manifest of another kind (same format name, another kind) is not ours either.
    other = tmp_path / "other-kind"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "llamascope-feature-store",
                                                     "kind": "release"}))
    with pytest.raises(FolderNotOwnedError, match="is not a feature store"):
        store.save(other)
    assert (other / "manifest.json").is_file()


def test_save_refuses_a_store_holding_user_files_and_replaces_a_clean_one(mined, tmp_path):
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    folder = store.save(tmp_path / "s")
    (folder / "my-notes.txt").write_text("mine")
    before = _tree(folder)
    with pytest.raises(FolderNotOwnedError) as err:
        store.save(folder)
    assert str(err.value) == (f"{folder} is a feature store but also holds files it did not "
                              "write (my-notes.txt); replacing it would delete them")
    assert _tree(folder) == before
    (folder / "my-notes.txt").unlink()
    # An earlier store (here with pages and samples) is replaced whole: nothing of it is left.
    (folder / "pages").mkdir()
    old = FeatureStore.load(folder)
    old.samples = None
    old.save(tmp_path / "t", extra=lambda st, tmp: (tmp / "pages").mkdir() or
             (tmp / "pages" / "index.html").write_text("old"))
    store.save(tmp_path / "t")
    assert not (tmp_path / "t" / "pages").exists()
    assert sorted(json.loads((tmp_path / "t" / MANIFEST).read_text())["files"]) == sorted(
        p for p in _tree(tmp_path / "t") if p != MANIFEST)


def test_save_refuses_a_file_and_an_unwritable_place(mined, tmp_path):
    """Issue 17 case 8 (the API side): a file, a path through a file."""
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    f = tmp_path / "afile"
    f.write_bytes(b"data\x00")
    with pytest.raises(FolderNotOwnedError) as err:
        store.save(f)
    assert str(err.value) == f"{f} is a file, not a folder; give a folder to write"
    assert f.read_bytes() == b"data\x00"
    with pytest.raises(OutputPathError) as err:
        store.save(f / "sub" / "store")
    assert str(err.value) == f"cannot create {f / 'sub' / 'store'}: {f} is a file, not a folder"


def test_deleting_pages_keeps_the_store_loadable(mined, tmp_path):
    """Issue 17 case 15."""
    import shutil

    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    folder = store.save(tmp_path / "s", extra=lambda st, tmp: __import__(
        "llamascope_sdk.store.pages", fromlist=["write_pages"]).write_pages(st, tmp / "pages", [3]))
    assert (folder / "pages" / "features" / "3.html").is_file()
    shutil.rmtree(folder / "pages")
    back = FeatureStore.load(folder)
    assert torch.equal(back.stats.frequency, res.stats.frequency)
    # ... and the store (its pages gone) can still be replaced by a new one.
    store.save(folder)
    # A required file missing is still refused, naming it.
    (folder / "top.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError) as err:
        FeatureStore.load(folder)
    assert str(err.value) == f"{folder}: files of the store are missing: ['top.safetensors']"


@pytest.mark.parametrize("name", ["top.safetensors", "histogram.safetensors", "samples.safetensors",
                                  "logit_lens.safetensors", "feature_stats.safetensors"])
def test_garbage_store_file_names_the_file(mined, tiny_llama, tmp_path, name):
    """Issue 17 case 12: a store file with a garbage header."""
    _, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer(), model=tiny_llama).save(tmp_path / "s")
    (folder / name).write_bytes(b"garbage garbage garbage")
    with pytest.raises(CorruptCheckpointError) as err:
        FeatureStore.load(folder)
    assert str(err.value).startswith(f"{folder / name}") and "not a readable safetensors file" in str(err.value)


def test_wrong_json_types_in_a_store(mined, tmp_path):
    """Issue 17 case 12: manifest.json or vocab.json holding a list; a tensor of the wrong shape."""
    _, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer()).save(tmp_path / "s")
    manifest = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text("[1, 2, 3]")
    with pytest.raises(CorruptCheckpointError) as err:
        FeatureStore.load(folder)
    assert str(err.value) == (f"{folder / MANIFEST}: expected a JSON object (the store's manifest), "
                              "found a list")
    (folder / MANIFEST).write_text(manifest.replace('"d_sae": 96', '"d_sae": "96"'))
    with pytest.raises(CorruptCheckpointError) as err:
        FeatureStore.load(folder)
    assert str(err.value) == f"{folder / MANIFEST}: 'd_sae' should be an integer, found '96'"
    (folder / MANIFEST).write_text(manifest.replace('"histogram_edges": [', '"histogram_edges": ["x", '))
    with pytest.raises(CorruptCheckpointError) as err:
        FeatureStore.load(folder)
    assert str(err.value) == f"{folder / MANIFEST}: 'histogram_edges' should be a list of numbers"
    (folder / MANIFEST).write_text(manifest)
    (folder / "vocab.json").write_text("[1, 2, 3]")
    with pytest.raises(CorruptCheckpointError) as err:
        FeatureStore.load(folder)
    assert str(err.value) == (f"{folder / 'vocab.json'}: expected a JSON object of token id -> "
                              "text, found a list")
    (folder / "vocab.json").write_text('{"5": 7}')
    with pytest.raises(CorruptCheckpointError, match="expected a JSON object of token id -> text, found '5': 7"):
        FeatureStore.load(folder)
    (folder / "vocab.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"counts": torch.zeros(95, 58, dtype=torch.long)}, str(folder / "histogram.safetensors"))
    with pytest.raises(CorruptCheckpointError) as err:
        FeatureStore.load(folder)
    assert str(err.value) == (f"{folder / 'histogram.safetensors'}: tensor 'counts' has shape "
                              "[95, 58], expected [96, 58]")


def test_store_refuses_another_sae_of_the_same_width(mined, tiny_llama, tmp_path):
    """Issue 17 case 2/6 (store side): the fingerprint of the weights, not only the width."""
    sae, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer()).save(tmp_path / "s")
    store = FeatureStore.load(folder)
    assert store.check_sae(sae) is store
    # The same SAE in bfloat16 still matches (the fingerprint is compared with a tolerance).
    assert store.check_sae(sae.to(torch.bfloat16)) is store
    sae.to(torch.float32)
    ids = torch.randint(3, 99, (2, 24))
    other = synthetic_sae(tiny_llama, ids, 1, "M", d_sae=96, seed=5, l0=12)
    assert other.d_sae == store.d_sae
    with pytest.raises(StoreMismatchError) as err:
        store.check_sae(other)
    assert str(err.value) == (f"the feature store {folder} was mined with SAE {sae.name!r}, not "
                              f"with {other.name!r} (W_dec weights differ; W_enc weights differ)")


def test_show_by_alias_finds_the_store_inspect_wrote(mined, tmp_path, monkeypatch):
    """Issue 17 case 14: `show l12r_8x` finds the store of L12R-8x; a store of another SAE in
    that place is refused."""
    from typer.testing import CliRunner

    from llamascope_sdk.cli import app
    from llamascope_sdk.store.feature_store import default_store_dir

    monkeypatch.setenv("LLAMASCOPE_CACHE", str(tmp_path / "cache"))
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    store.meta["sae"] = "L12R-8x"
    store.save(default_store_dir("L12R-8x"))
    for spelling in ("L12R-8x", "l12r_8x", "llama3.1-8b/12-llamascope-res-32k"):
        got = load_store(spelling)
        assert got.name == "L12R-8x" and got.path == default_store_dir("L12R-8x")
    out = CliRunner().invoke(app, ["show", "l12r_8x", "3", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["sae"] == "L12R-8x"
    store.meta["sae"] = "L13R-8x"
    store.save(default_store_dir("L12R-8x"))
    with pytest.raises(StoreMismatchError) as err:
        load_store("l12r_8x")
    assert str(err.value) == (f"{default_store_dir('L12R-8x')} holds the store of 'L13R-8x', "
                              "not of 'l12r_8x'")


def test_a_store_with_explanations_is_replaced_but_not_user_files_among_them(mined, tmp_path):
    """`llamascope explain` writes STORE/explanations/...: the SDK's own, so mining again replaces
    them with the store; a user's file among them still makes the folder refused."""
    _, res = mined
    store = FeatureStore.from_result(res, CharTokenizer())
    folder = store.save(tmp_path / "s")
    rec = folder / "explanations" / "gpt-4o" / "features" / "3.json"
    rec.parent.mkdir(parents=True)
    rec.write_text("{}")
    (folder / "explanations" / "gpt-4o" / "config.json").write_text("{}")
    (folder / "explanations" / "gpt-4o" / "mine.md").write_text("my notes")
    with pytest.raises(FolderNotOwnedError, match=r"\(explanations/gpt-4o/mine.md\)"):
        store.save(folder)
    assert (folder / "explanations" / "gpt-4o" / "mine.md").read_text() == "my notes"
    (folder / "explanations" / "gpt-4o" / "mine.md").unlink()
    store.save(folder)
    assert not (folder / "explanations").exists()


def test_a_store_of_another_sae_is_not_replaced(mined, tiny_llama, tmp_path):
    """Issue 17 case 6 (store side): one SAE's store never replaces another's, even when both
    are called the same (the fingerprint decides); the same SAE re-mined replaces its own."""
    from llamascope_sdk.store.feature_store import check_store_target

    sae, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer()).save(tmp_path / "s")
    before = _tree(folder)
    assert check_store_target(folder, sae) == folder
    other = synthetic_sae(tiny_llama, torch.randint(3, 99, (2, 24)), 1, "M", d_sae=96, seed=5, l0=12)
    other.source.subfolder = sae.name  # the same name: only the weights tell them apart
    with pytest.raises(StoreMismatchError) as err:
        check_store_target(folder, other)
    assert str(err.value) == (f"{folder} holds the feature store of SAE {sae.name!r} (W_dec weights "
                              f"differ; W_enc weights differ); a store of {sae.name!r} does not "
                              "replace it")
    assert _tree(folder) == before


def test_stats_are_not_saved_into_another_saes_folder(tmp_path):
    """Issue 17 case 2/3: --save-stats-to the folder of another SAE (or over statistics of
    another width) would mix two SAEs: refused, intact; the SAE's own folder is fine."""
    from llamascope_sdk import SAE
    from llamascope_sdk.store.feature_store import check_stats_target

    from .helpers import make_release

    mine_dir = make_release(tmp_path / "mine", d_sae=256)
    other_dir = make_release(tmp_path / "other", d_sae=256, seed=1)
    sae = SAE.from_pretrained(str(mine_dir))
    assert check_stats_target(mine_dir, sae) == mine_dir / "feature_stats.safetensors"
    before = _tree(other_dir)
    with pytest.raises(OutputPathError) as err:
        check_stats_target(other_dir, sae)
    assert str(err.value) == (f"{other_dir} is the folder of another SAE than 'mine': its "
                              "statistics would describe the wrong weights")
    assert _tree(other_dir) == before
    plain = tmp_path / "plain"
    plain.mkdir()
    n = torch.zeros(96)
    FeatureStats(mean=n.clone(), typical=n.clone(), frequency=n.clone(), n_tokens=1).save(plain)
    with pytest.raises(OutputPathError) as err:
        check_stats_target(plain, sae)
    assert str(err.value) == (f"{plain / 'feature_stats.safetensors'} holds statistics of 96 "
                              "features, not of 'mine' (256): they belong to another SAE and are "
                              "not overwritten")
