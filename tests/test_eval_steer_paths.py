"""Issue 27, item 8: `eval-steer` checks every output path and reaches its judge before any
model work; the results without the judge are on disk before the judge runs, and a judge
failure leaves them there with one line."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llamascope_sdk.cli import app
from tests.fake_endpoint import FakeEndpoint, Status
from tests.helpers import tiny_sae

from .test_eval_steer import _Tok

runner = CliRunner()


@pytest.fixture
def loader(monkeypatch, tiny_llama):
    """The tiny model and SAE instead of a real load; ``calls`` says whether it was reached."""
    calls: list[str] = []

    def load(*args, **kwargs):
        calls.append("loaded")
        return tiny_sae(layer=1, d_sae=64, threshold=0.0), tiny_llama, _Tok()

    monkeypatch.setattr("llamascope_sdk.cli.eval_steer.load_sae_and_model", load)
    return calls


def _args(tmp_path) -> list[str]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nhello wo\nabc d\nxyz a\n")
    return ["eval-steer", "--sae", "tiny", "-f", "3", "--strengths", "0,4", "-n", "2",
            "--prompts", str(prompts), "--concept", "cat"]


def _one_line(res, message: str) -> None:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "Errno" not in res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: {message}"], res.stderr


def test_export_serve_onto_an_existing_file_fails_before_loading(tmp_path, loader):
    """Before: it failed after the whole sweep (48 s on the demo) and the results were lost."""
    target = tmp_path / "body.json"
    target.write_text("mine")
    res = runner.invoke(app, [*_args(tmp_path), "--export-serve", str(target)])
    _one_line(res, f"--export-serve {target} exists; choose a new file name (it is never "
                   "overwritten)")
    assert loader == [] and target.read_text() == "mine"


def test_plot_onto_a_file_fails_in_one_line_before_loading(tmp_path, loader):
    """Before: a bare `[Errno 17] File exists` after the sweep."""
    pytest.importorskip("matplotlib")
    target = tmp_path / "plot.png"
    target.write_bytes(b"picture")
    res = runner.invoke(app, [*_args(tmp_path), "--plot", str(target)])
    _one_line(res, f"--plot {target} is a file; give a folder (one PNG per feature is written "
                   "into it)")
    assert loader == [] and target.read_bytes() == b"picture"


def test_a_judge_that_is_down_fails_before_loading(tmp_path, loader):
    """Before: a judge that was down failed after the sweep (about 230 s on the demo)."""
    with FakeEndpoint(reply=lambda m: Status(503), lifetime=30) as fake:
        url = fake.url
        res = runner.invoke(app, [*_args(tmp_path), "--judge", url, "--judge-model", "j"])
    _one_line(res, f"{url}/chat/completions: no answer after 2 attempts (last: HTTP 503: "
                   '{"error": {"message": "scripted error"}})')
    assert loader == []


def test_a_judge_failure_keeps_the_results_without_it(tmp_path, loader):
    """Before: a judge failing during the run lost every LLM-free result too."""
    out = tmp_path / "results.json"
    # the probe is answered; every judge request after it is refused (HTTP 400: no retry)
    with FakeEndpoint(script=["Rating: [[2]]"], reply=lambda m: Status(400), lifetime=60) as fake:
        url = fake.url
        res = runner.invoke(app, [*_args(tmp_path), "--judge", url, "--judge-model", "j",
                                  "--out", str(out)])
    _one_line(res, f"the judge failed ({url}/chat/completions answered HTTP 400: "
                   '{"error": {"message": "scripted error"}}); the results without the judge '
                   f"are kept in {out}")
    assert loader == ["loaded"]
    kept = json.loads(out.read_text())
    assert kept["judge"].startswith("not run") and kept["features"][0]["feature"] == 3
    points = kept["features"][0]["curves"]["feature"]
    assert [p["strength"] for p in points] == [0, 4] and all(p["judge"] is None for p in points)


def test_without_a_judge_out_holds_the_report(tmp_path, loader):
    out = tmp_path / "results.json"
    res = runner.invoke(app, [*_args(tmp_path), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text()) == json.loads(res.stdout)
    again = runner.invoke(app, [*_args(tmp_path), "--out", str(out)])
    _one_line(again, f"--out {out} exists; choose a new file name (it is never overwritten)")
