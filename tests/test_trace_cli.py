"""`llamascope trace` end to end on SmolLM2 with transcoders saved to folders (the demo set
is built elsewhere), and every refusal answered in one line before any model loads."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llamascope_sdk.cli import app
from llamascope_sdk.trace import Graph
from tests.helpers import make_release

runner = CliRunner()
PROMPT = "The cat sat on the mat, and the dog sat on the"


def _no_model(*_a, **_k):
    raise AssertionError("the model was loaded before the input was checked")


@pytest.fixture()
def folders(tmp_path):
    """Three random SmolLM2-width transcoders (layers 2, 9, 20) in the release layout, and an
    R SAE that is no transcoder."""
    tcs = [make_release(tmp_path / f"L{layer}TC", position="TC", layer=layer, d_model=576,
                        d_sae=192, norm_in=24.0) for layer in (2, 9, 20)]
    resid = make_release(tmp_path / "L4R", position="R", layer=4, d_model=576, d_sae=192)
    return tcs, resid


@pytest.mark.parametrize("args,message", [
    (["--node-threshold", "0"], "--node-threshold 0 is outside (0, 1]"),
    (["--edge-threshold", "1.5"], "--edge-threshold 1.5 is outside (0, 1]"),
    (["--transcoders", "L12R-8x"], "is not a transcoder"),
    (["--transcoders", "no-such-thing"], "neither a folder nor a Llama Scope transcoder name"),
])
def test_refusals_before_any_model(monkeypatch, tmp_path, folders, args, message) -> None:
    monkeypatch.setattr("llamascope_sdk.loading.models.load_model", _no_model)
    base = ["trace", "--transcoders", str(folders[0][0]), "--prompt", PROMPT, "--out",
            str(tmp_path / "out"), "--model", "smollm2-135m"]
    res = runner.invoke(app, base + args)
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_transcoder_folder_and_a_foreign_out(monkeypatch, tmp_path, folders) -> None:
    monkeypatch.setattr("llamascope_sdk.loading.models.load_model", _no_model)
    res = runner.invoke(app, ["trace", "-t", str(folders[1]), "-p", PROMPT, "-o",
                              str(tmp_path / "o"), "-m", "smollm2-135m"])
    assert res.exit_code == 1 and "is not a transcoder" in res.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    res = runner.invoke(app, ["trace", "-t", str(folders[0][0]), "-p", PROMPT, "-o", str(mine),
                              "-m", "smollm2-135m"])
    assert res.exit_code == 1 and "not the output of llamascope trace" in res.output
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.smollm
def test_refuses_a_prompt_over_the_window(monkeypatch, tmp_path, folders) -> None:
    monkeypatch.setattr("llamascope_sdk.loading.models.load_model", _no_model)
    long = "word " * 9000
    res = runner.invoke(app, ["trace", "-t", str(folders[0][0]), "-p", long, "-o",
                              str(tmp_path / "o"), "-m", "smollm2-135m"])
    assert res.exit_code == 1 and "more than the model's window" in res.output


@pytest.mark.smollm
def test_trace_writes_graph_view_and_paths(smollm2, tmp_path, folders) -> None:
    tcs, _ = folders
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"The {w} sat on the mat and looked at the {w}." for w in
                                  ("cat", "dog", "bird", "fox", "cow", "owl")))
    stores = tmp_path / "stores"
    res = runner.invoke(app, ["inspect", *sum((["--sae", str(t)] for t in tcs), []),
                              "--dataset", str(corpus), "--tokens", "200", "--out", str(stores),
                              "--max-pages", "3", "--model", "smollm2-135m", "--json"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "trace"
    args = ["trace", "-t", ",".join(str(t) for t in tcs), "-p", PROMPT, "-o", str(out),
            "-m", "smollm2-135m", "--max-nodes", "200", "--batch-size", "64",
            "--store", str(stores)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Strongest paths into logit" in res.output and "estimated peak memory" in res.output
    graph = Graph.load(out)
    assert graph.transcoder_layers == [2, 9, 20] and 0 < graph.n_features <= 200
    viewer = json.loads((out / "viewer.json").read_text())
    assert viewer["metadata"]["prompt"] == PROMPT
    page = (out / "graph.html").read_text()
    assert "llamascope steer --sae" in page and "http://" not in page.replace("http://www.w3.org", "")
    res = runner.invoke(app, [*args, "--json", "--target", " the"])  # replaces its own output
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [x["token"] for x in report["logits"]] == [" the"] and report["paths"]


@pytest.mark.smollm
def test_llama_scope_set_on_another_model_is_refused_before_loading(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr("llamascope_sdk.loading.models.load_model", _no_model)
    res = runner.invoke(app, ["trace", "-t", "LXTC-8x", "-p", PROMPT, "-o", str(tmp_path / "o"),
                              "-m", "smollm2-135m"])
    assert res.exit_code == 1, res.output
    assert "d_model=4096 does not match" in res.output and "hidden_size=576" in res.output
