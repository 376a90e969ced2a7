"""The CLI refuses bad input with one line and a hint: devices, prompts, lengths, JSON, help."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from llamascope_sdk.cli import app

runner = CliRunner()


def _one_line_error(res, *fragments: str) -> None:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "looks like a bug" not in res.output
    err = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, res.stderr
    for f in fragments:
        assert f in res.stderr, (f, res.stderr)
    assert "hint: " in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_says_use_cpu() -> None:
    res = runner.invoke(app, ["steer", "--sae", "demo", "--device", "cuda", "-n", "2"])
    _one_line_error(res, "CUDA is not available", "use --device cpu")


@pytest.mark.parametrize(("device", "fragment"), [("meta", "device 'meta' holds no data"),
                                                  ("tpu9", "unknown device 'tpu9'"),
                                                  ("cpu:x", "unknown device")])
def test_unusable_devices(device: str, fragment: str) -> None:
    res = runner.invoke(app, ["encode", "--sae", "demo", "--device", device])
    _one_line_error(res, fragment)


def test_empty_prompt_is_refused_not_replaced() -> None:
    res = runner.invoke(app, ["steer", "--sae", "demo", "--prompt", "", "-n", "2"])
    _one_line_error(res, "--prompt is empty")
    res = runner.invoke(app, ["encode", "--sae", "demo", "--prompt", "   "])
    _one_line_error(res, "--prompt is empty")


def test_non_utf8_prompt_bytes_are_one_line() -> None:
    # What a terminal with another encoding passes: bytes that are not UTF-8, which Python
    # decodes with surrogateescape.
    env = {**os.environ, "PYTHONUTF8": "1"}
    p = subprocess.run([sys.executable, "-m", "llamascope_sdk", "encode", "--sae", "demo",
                        "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: --prompt is not valid UTF-8 text"), p.stderr


def test_max_new_tokens_is_bounded() -> None:
    res = runner.invoke(app, ["steer", "--sae", "demo", "-n", "1000000000"])
    assert res.exit_code == 2 and "less than or equal to 4096" in res.output


@pytest.mark.smollm
def test_prompt_longer_than_the_window_names_the_limit(smollm2) -> None:
    window = smollm2[0].config.max_position_embeddings
    res = runner.invoke(app, ["steer", "--sae", "demo", "-n", "4", "--prompt", "word " * window])
    _one_line_error(res, f"the model's window of {window} positions")


@pytest.mark.smollm
def test_json_is_strict_and_progress_stays_off_stdout() -> None:
    res = runner.invoke(app, ["steer", "--sae", "demo", "-n", "3", "--json"])
    assert res.exit_code == 0, res.output

    def no_constants(name: str) -> float:
        raise AssertionError(f"non-JSON constant {name}")

    out = json.loads(res.stdout, parse_constant=no_constants)
    assert math.isfinite(out["value"]) and out["value"] == 40.0
    assert out["description"].startswith("steer feature 1297 'archaic pronouns")


@pytest.mark.smollm
def test_caption_states_units_raw_and_relative() -> None:
    from llamascope_sdk import SAE

    sae = SAE.from_pretrained("demo")
    site_norm = sae.hyperparams.dataset_average_activation_norm.out
    typical = float(sae.stats.typical[1297])
    raw = json.loads(runner.invoke(app, ["steer", "--sae", "demo", "-n", "2", "--json"]).stdout)
    assert f"a vector of length +40 along its unit decoder direction ({40 / site_norm:.2f} x the " \
           f"site's mean norm {site_norm:.4g})" in raw["description"]
    rel = json.loads(runner.invoke(app, ["steer", "--sae", "demo", "-n", "2", "--relative",
                                         "-a", "3", "--json"]).stdout)
    assert f"3 x typical activation = a vector of length {3 * typical:+.4g}" in rel["description"]


@pytest.mark.smollm
def test_chat_steers_only_the_assistant_reply(smollm2) -> None:
    from llamascope_sdk import SAE, Steer, compare_generations
    from llamascope_sdk.steering.generation import prompt_ids

    model, tok = smollm2
    sae = SAE.from_pretrained("demo")
    res = runner.invoke(app, ["steer", "--sae", "demo", "--chat", "-n", "12", "--json",
                              "--prompt", "Tell me about the sea."])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["chat"] is True and out["baseline"] != out["steered"]
    assert "positions=generated" in out["description"]
    # The prompt is the chat template of one user turn, ending with the assistant's opening.
    ids = prompt_ids(tok, "Tell me about the sea.", chat=True)[0].tolist()
    want = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                   add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == want and want.rstrip().endswith("assistant")
    # Steering only generated positions leaves the first reply token (predicted from the
    # prompt) unchanged, as the library call with the same settings shows.
    lib = compare_generations(model, tok, "Tell me about the sea.",
                              [Steer(sae, [1297], 40.0, positions="generated")],
                              max_new_tokens=12, chat=True)
    assert lib.steered_ids == out["steered_ids"] and lib.baseline_ids == out["baseline_ids"]
    assert lib.steered_ids[0] == lib.baseline_ids[0]


def test_help_of_every_command_fits_80_columns() -> None:
    import typer.main

    cmd = typer.main.get_command(app)
    names = [None, *cmd.commands]  # type: ignore[attr-defined]
    for name in names:
        args = ["--help"] if name is None else [name, "--help"]
        res = runner.invoke(app, args, terminal_width=80, env={"COLUMNS": "80"})
        assert res.exit_code == 0, (name, res.output)
        wide = [line for line in res.output.splitlines() if len(line) > 80]
        assert not wide, (name, wide)
        assert "<bool>" not in res.output, name


def test_eval_explains_metrics_and_never_prints_none(tmp_path, smollm2) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The sea is wide and deep. Ships sail on it every day.\n\n" * 6)
    res = runner.invoke(app, ["eval", "demo", "--dataset", str(text), "--tokens", "80",
                              "--context", "32"])
    assert res.exit_code == 0, res.output
    assert "None" not in res.stdout
    assert "not measured (add --zero-ablation)" in res.stdout
    assert "mean number of features firing per counted token" in res.stdout
