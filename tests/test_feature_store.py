"""The feature store round-trips without the model and refuses half-written folders."""

from __future__ import annotations

import json

import pytest
import torch

from llamascope_sdk.feature_stats import FeatureStats
from llamascope_sdk.feature_store import MANIFEST, FeatureStore, IncompleteStoreError, load_store
from llamascope_sdk.mining import mine

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
    f = back.feature(i)
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
    with pytest.raises(FileExistsError):
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
