"""Issue 27, items 5 and 9: a store's optional files (scores, explanations) are checked like
the required ones, a bad one is reported in one line while the rest of the store still works,
nothing is read through a link that leaves the store, and every writer of scores, labels or
explanations refuses another SAE's store or folder by fingerprint."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk.base.errors import CorruptCheckpointError, StoreMismatchError
from llamascope_sdk.cli import app
from llamascope_sdk.store.explanations import feature_explanations, write_feature
from llamascope_sdk.store.feature_store import FeatureStore
from llamascope_sdk.store.scores import SCORES_FILE, FeatureScores, load_scores

from .conftest import CharTokenizer
from .test_feature_store import mined  # noqa: F401  (fixture)

runner = CliRunner()


@pytest.fixture
def store(mined, tmp_path):  # noqa: F811
    sae, res = mined
    return FeatureStore.from_result(res, CharTokenizer()).save(tmp_path / "st")


def _scores(n: int, *, meta: dict | None = None) -> FeatureScores:
    out = torch.full((n,), math.nan)
    dtc = torch.full((n,), math.nan)
    out[:4] = torch.tensor([0.5, 0.25, 0.75, 0.1])
    dtc[:4] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    return FeatureScores(out, dtc, meta or {})


def _tamper(folder, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / SCORES_FILE
    t = load_file(str(path))
    change(t)
    save_file(t, str(path))


BAD_SCORES = {
    "wrong length": (lambda t: t.update(output_score=t["output_score"][:-1],
                                        delta_token_confidence=t["delta_token_confidence"][:-1]),
                     "scores of 95 features, but the store has 96"),
    "inf": (lambda t: t["output_score"].__setitem__(2, math.inf),
            "'output_score' is inf at feature 2; scores lie in [0, 1] (NaN: not scored)"),
    "nan confidence": (lambda t: t["delta_token_confidence"].__setitem__(1, math.nan),
                       "'delta_token_confidence' is NaN at feature 1 where 'output_score' is "
                       "not (both are NaN for a feature that was not scored)"),
    "float64": (lambda t: t.update(output_score=t["output_score"].double()),
                "'output_score' is float64, expected float32"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCORES))
def test_tampered_scores_are_one_line_and_the_store_still_works(store, case):
    change, why = BAD_SCORES[case]
    _scores(96).save(store)
    _tamper(store, change)
    path = store / SCORES_FILE
    with pytest.raises(CorruptCheckpointError) as info:
        load_scores(store, d_sae=96)
    assert str(info.value) == f"{path}: {why}"
    shown = runner.invoke(app, ["show", str(store), "2"])
    assert shown.exit_code == 0, shown.output
    assert f"scores not shown: {path}: {why}" in shown.stdout
    assert "frequency" in shown.stdout  # the rest of the feature is there
    js = runner.invoke(app, ["show", str(store), "2", "--json"])
    assert js.exit_code == 0, js.output
    data = json.loads(js.stdout)
    assert data["scores_error"] == f"{path}: {why}" and "scores" not in data
    ranked = runner.invoke(app, ["search", "--sae", "x", "--store", str(store), "--sort",
                                 "output-score"])
    assert ranked.exit_code == 1
    assert ranked.stderr.splitlines()[0] == f"error: {path}: {why}"


def test_good_scores_still_show(store):
    _scores(96).save(store)
    js = json.loads(runner.invoke(app, ["show", str(store), "2", "--json"]).stdout)
    assert js["scores"]["output_score"] == pytest.approx(0.75)
    assert js["scores"]["output_score_rank"] == 1 and "scores_error" not in js


def test_a_scores_file_linking_out_of_the_store_is_not_read(store, tmp_path):
    outside = tmp_path / "elsewhere"
    _scores(96).save(outside)
    (store / SCORES_FILE).symlink_to(outside / SCORES_FILE)
    with pytest.raises(CorruptCheckpointError, match="is a link out of the store; not read"):
        load_scores(store, d_sae=96)


# ---------------------------------------------------------------- explanation records


def _record(i: int, text: str = "cats") -> dict:
    return {"feature": i, "sae": "s", "model": "m", "prompt_version": "v1",
            "explanation": text, "scores": None, "note": None}


def _explainer(store) -> None:
    folder = store / "explanations" / "m"
    (folder / "features").mkdir(parents=True)
    (folder / "config.json").write_text("{}\n")
    return folder


@pytest.mark.parametrize(("content", "why"), [
    ('{"feature": 3, "explanation": "ca', "not readable JSON"),
    (json.dumps(_record(4)), "its 'feature' field is 4, not 3"),
    (json.dumps({**_record(3), "explanation": ["x"]}), "'explanation' should be a string"),
    (json.dumps({**_record(3), "scores": {"detection": {"balanced_accuracy": 7}}}),
     "scores.detection.balanced_accuracy should be a number in [0, 1] or null"),
])
def test_a_bad_explanation_record_is_reported_not_used(store, content, why):
    folder = _explainer(store)
    path = folder / "features" / "3.json"
    path.write_text(content)
    info = feature_explanations(store, 3)
    assert info["explanations"] == []
    assert len(info["explanation_errors"]) == 1 and info["explanation_errors"][0].startswith(f"{path}: {why}")
    shown = runner.invoke(app, ["show", str(store), "3"])
    assert shown.exit_code == 0
    assert f"explanation not used: {path}: {why}" in shown.stdout


def test_a_good_record_is_used(store):
    folder = _explainer(store)
    write_feature(folder, 3, _record(3))
    info = feature_explanations(store, 3)
    assert [r["explanation"] for r in info["explanations"]] == ["cats"] and not info["explanation_errors"]


def test_explanations_linked_from_outside_the_store_are_not_read(store, tmp_path):
    outside = tmp_path / "outside-explanations"
    (outside / "m" / "features").mkdir(parents=True)
    (outside / "m" / "config.json").write_text("{}\n")
    (outside / "m" / "features" / "3.json").write_text(json.dumps(_record(3, "planted")))
    (store / "explanations").symlink_to(outside)
    info = feature_explanations(store, 3)
    assert info["explanations"] == []
    assert info["explanation_errors"] == [f"{store / 'explanations'}: a link out of the store; not read"]


# ---------------------------------------------------------------- writers check the SAE


def test_scores_of_another_sae_are_not_saved_into_a_store(mined, store):  # noqa: F811
    from llamascope_sdk.base.fingerprint import fingerprint

    sae, _ = mined
    fp = fingerprint(sae)
    other = {**fp, "W_dec": [v + 1.0 for v in fp["W_dec"]]}
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(StoreMismatchError) as info:
        _scores(96, meta={"sae": "other", "fingerprint": json.dumps(other)}).save(store)
    assert str(info.value).startswith(f"the feature store {store} belongs to SAE {sae.name!r}, "
                                      "not to 'other' (W_dec weights differ): scores of 'other' "
                                      "are not written there")
    assert sorted(p.name for p in store.iterdir()) == before
    _scores(96, meta={"sae": sae.name, "fingerprint": json.dumps(fp)}).save(store)  # its own
    assert (store / SCORES_FILE).is_file()


def _tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def other_sae(mined, tiny_llama):  # noqa: F811
    """An SAE of the same width and site as the mined one, with other weights."""
    from .test_hooks import synthetic_sae

    torch.manual_seed(1)
    ids = torch.randint(3, 99, (2, 24))
    ids[:, 0] = 1
    return synthetic_sae(tiny_llama, ids, 1, "M", d_sae=96, l0=12, seed=5)


def test_score_features_refuses_another_saes_store_before_scoring(mined, store, other_sae,  # noqa: F811
                                                                   tiny_llama, monkeypatch):
    """Before: `score-features --sae OTHER --store STORE` overwrote the store's scores, exit 0."""
    sae, _ = mined
    _scores(96, meta={"sae": sae.name}).save(store)
    before = _tree(store)
    monkeypatch.setattr("llamascope_sdk.cli.eval_steer.load_sae_and_model",
                        lambda *a, **k: (other_sae, tiny_llama, CharTokenizer()))

    def no_scoring(*a, **k):
        raise AssertionError("scored another SAE's features")

    monkeypatch.setattr("llamascope_sdk.store.scores.score_features", no_scoring)
    res = runner.invoke(app, ["score-features", "--sae", "x", "--store", str(store)])
    assert res.exit_code == 1, res.output
    assert res.stderr.splitlines()[0] == (
        f"error: the feature store {store} was mined with SAE {sae.name!r}, not with "
        f"{other_sae.name!r} (W_dec weights differ; W_enc weights differ)")
    assert _tree(store) == before


def test_save_labels_to_another_saes_folder_is_refused_before_any_work(mined, store, other_sae,  # noqa: F811
                                                                       tmp_path, monkeypatch):
    """Before: `explain --save-labels-to` wrote one SAE's explanations into another SAE's
    folder, whose `steer` captions then showed them."""
    sae, _ = mined
    folder = tmp_path / "other-sae"
    other_sae.save_pretrained(folder)
    before = _tree(folder)

    def no_work(*a, **k):
        raise AssertionError("work started")

    monkeypatch.setattr("llamascope_sdk.cli.explain._select", no_work)
    res = runner.invoke(app, ["explain", str(store), "--features", "3", "--save-labels-to",
                              str(folder)])
    assert res.exit_code == 1, res.output
    assert res.stderr.splitlines()[0] == (
        f"error: {folder} (an SAE folder) belongs to SAE 'other-sae', not to "
        f"{sae.name!r} (W_dec weights differ; W_enc weights differ): labels of {sae.name!r} "
        "are not written there")
    assert _tree(folder) == before


def test_save_labels_to_another_saes_store_and_out_into_it_are_refused(mined, store, tmp_path,  # noqa: F811
                                                                       monkeypatch):
    sae, res = mined
    other = FeatureStore.from_result(res, CharTokenizer())
    other.meta["fingerprint"] = {**other.meta["fingerprint"],
                                 "W_enc": [v + 1.0 for v in other.meta["fingerprint"]["W_enc"]]}
    other.meta["sae"] = "someone-else"
    folder = other.save(tmp_path / "other-store")
    before = _tree(folder)
    monkeypatch.setattr("llamascope_sdk.cli.explain._select", lambda *a, **k: [3])
    for args in (["--save-labels-to", str(folder)],
                 ["--out", str(folder / "explanations" / "m"), "--endpoint", "http://x/v1",
                  "-m", "m"]):
        out = runner.invoke(app, ["explain", str(store), "--features", "3", *args])
        assert out.exit_code == 1, out.output
        what = "labels" if args[0] == "--save-labels-to" else "explanations"
        assert out.stderr.splitlines()[0] == (
            f"error: the feature store {folder} belongs to SAE 'someone-else', not to "
            f"{sae.name!r} (W_enc weights differ): {what} of {sae.name!r} are not written "
            "there")
    assert _tree(folder) == before


def test_labels_go_to_the_saes_own_folder_or_a_plain_one(mined, store, tmp_path):  # noqa: F811
    from llamascope_sdk.store.feature_store import FeatureStore as Store
    from llamascope_sdk.store.ownership import check_labels_target

    sae, _ = mined
    own = tmp_path / "own-sae"
    sae.save_pretrained(own)
    st = Store.load(store)
    check_labels_target(own, st)  # the same weights: accepted
    check_labels_target(tmp_path / "new-folder", st)  # nothing there names an SAE
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    check_labels_target(tmp_path / "plain", st)


# ---------------------------------------------------------------- other optional files


@pytest.mark.parametrize(("name", "content", "why"), [
    ("samples.safetensors", b"garbage garbage garbage", "not a readable safetensors file"),
    ("logit_lens.safetensors", None, "tensor 'top_values' holds nan at [0, 0]; values are finite"),
    ("feature_labels.json", b'{"999": "x"}', "feature index 999 is out of range 0..95"),
])
def test_a_bad_optional_file_is_one_line_and_the_rest_works(mined, tiny_llama, tmp_path,  # noqa: F811
                                                            name, content, why):
    from safetensors.torch import load_file, save_file

    _, res = mined
    folder = FeatureStore.from_result(res, CharTokenizer(), model=tiny_llama).save(tmp_path / "s")
    path = folder / name
    if content is None:
        t = load_file(str(path))
        t["top_values"][0, 0] = math.nan
        save_file(t, str(path))
    else:
        path.write_bytes(content)
    st = FeatureStore.load(folder)
    assert len(st.problems) == 1 and st.problems[0].startswith(f"{path}: ")
    assert why in st.problems[0] and st.problems[0].endswith("; not used")
    shown = runner.invoke(app, ["show", str(folder), "3"])
    assert shown.exit_code == 0, shown.output
    assert f"store file not used: {st.problems[0]}" in shown.stdout
    js = json.loads(runner.invoke(app, ["show", str(folder), "3", "--json"]).stdout)
    assert js["store_errors"] == st.problems


def test_a_required_file_linking_out_of_the_store_is_refused(store, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((store / "top.safetensors").read_bytes())
    (store / "top.safetensors").unlink()
    (store / "top.safetensors").symlink_to(outside)
    with pytest.raises(CorruptCheckpointError, match=r"files of the store are links out of "
                       r"it: \['top.safetensors'\]; not read"):
        FeatureStore.load(store)


def test_search_text_names_the_records_it_cannot_use(store):
    folder = _explainer(store)
    write_feature(folder, 3, _record(3, "cats on mats"))
    bad = folder / "features" / "5.json"
    bad.write_text(json.dumps(_record(6, "cats everywhere")))  # names another feature
    res = runner.invoke(app, ["search", "--sae", "x", "--store", str(store), "--text", "cats",
                              "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [h["feature"] for h in data["hits"]] == [3]
    assert data["explanation_errors"] == [f"{bad}: its 'feature' field is 6, not 5"]


def test_pages_are_not_refreshed_through_a_link_out_of_the_store(store, tmp_path):
    from llamascope_sdk.store.feature_store import FeatureStore as Store
    from llamascope_sdk.store.pages import refresh_pages

    outside = tmp_path / "someone-elses-site"
    (outside / "features").mkdir(parents=True)
    (outside / "features" / "3.html").write_text("theirs")
    (store / "pages").symlink_to(outside)
    assert refresh_pages(Store.load(store), [3]) == 0
    assert (outside / "features" / "3.html").read_text() == "theirs"


def test_scores_copied_from_another_saes_store_are_not_used(mined, store, tmp_path):  # noqa: F811
    import shutil

    from llamascope_sdk.base.fingerprint import fingerprint
    from llamascope_sdk.store.feature_store import FeatureStore as Store
    from llamascope_sdk.store.scores import scores_of

    sae, _ = mined
    fp = fingerprint(sae)
    other = {**fp, "W_enc": [v + 1.0 for v in fp["W_enc"]]}
    elsewhere = _scores(96, meta={"sae": "other", "fingerprint": json.dumps(other)}).save(
        tmp_path / "plain-folder")
    shutil.copy(elsewhere, store / SCORES_FILE)
    with pytest.raises(CorruptCheckpointError) as info:
        scores_of(Store.load(store))
    assert str(info.value) == (f"{store / SCORES_FILE}: scores of another SAE ('other') than "
                               "the store's (fingerprints differ)")
