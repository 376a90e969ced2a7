"""`llamascope eval-steer` and `score-features` on the command line: bad input is one line before
anything loads; a small demo run gives the table's JSON, a plot and both exports."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from llamascope_sdk.cli import app

runner = CliRunner()


@pytest.mark.parametrize(("args", "said"), [
    (["--mode", "boost"], "allowed are add, clamp, scale"),
    (["--strengths", "0,ten"], "not a comma-separated list"),
    (["--strengths", "0,nan"], "finite"),
    (["--judge", "http://127.0.0.1:9/v1"], "--judge and --judge-model go together"),
    (["--mode", "clamp", "--export-lm-eval", "x.pt"], "exports add edits only"),
])
def test_bad_input_is_one_line(args, said, tmp_path):
    res = runner.invoke(app, ["eval-steer", "--sae", "demo", "-f", "4154", *args])
    assert res.exit_code != 0
    assert said in res.output


def test_prompts_file_checked_first(tmp_path):
    one = tmp_path / "p.txt"
    one.write_text("only one prompt\n\n")
    res = runner.invoke(app, ["eval-steer", "--sae", "demo", "-f", "1", "--prompts", str(one)])
    assert res.exit_code == 1 and "holds 1 prompt(s); give at least 2" in res.output
    res = runner.invoke(app, ["eval-steer", "--sae", "demo", "-f", "1", "--prompts",
                              str(tmp_path / "missing.txt")])
    assert res.exit_code == 1 and "no such file" in res.output


@pytest.mark.smollm
@pytest.mark.slow
def test_small_demo_run_json_plot_exports(smollm2, tmp_path):
    import torch

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sea is\nMy city has\nThe book was\nRain falls on\n")
    out = tmp_path / "out"
    res = runner.invoke(app, ["eval-steer", "--sae", "demo", "-f", "4154", "--strengths",
                              "0,40", "-n", "4", "--prompts", str(prompts), "--concept",
                              "thou art", "--plot", str(out), "--export-lm-eval",
                              str(out / "steer.pt"), "--export-serve", str(out / "req.json"),
                              "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    feat = rep["features"][0]
    assert feat["feature"] == 4154 and set(feat["curves"]) == {"feature", "diffmean", "prompt",
                                                               "none"}
    assert [p["strength"] for p in feat["curves"]["feature"]] == [0, 40]
    assert feat["concept_measure"].startswith("concept lift")
    assert feat["concept"] == "thou art" and feat["concept_source"]["source"] == "given"
    png = out / "eval_steer_smollm2-135m-L15R-8x_4154.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rep["plots"]["4154"] == str(png)
    chosen = feat["chosen"]["feature"]["strength"]
    body = json.loads((out / "req.json").read_text())
    assert body["steering"][0] == {"sae": "demo", "feature": 4154, "mode": "add",
                                   "value": chosen, "relative": False, "positions": "all"}
    from llamascope_sdk import SAE

    # what lm-eval does with the file (our own export, read back; the SDK never loads .pt)
    cfg = torch.load(out / "steer.pt", weights_only=True)  # noqa: TID251
    want = chosen * SAE.from_pretrained("demo").W_dec[4154]
    torch.testing.assert_close(cfg["layers.15"]["steering_vector"], want)
