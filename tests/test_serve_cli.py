"""`llamascope serve` options are checked before the model loads, one line each."""

from __future__ import annotations

from typer.testing import CliRunner

from llamascope_sdk.cli import app


def _run(*args: str):
    return CliRunner().invoke(app, ["serve", *args])


def test_bad_memory_size_is_one_line() -> None:
    r = _run("--model", "smollm2-135m", "--sae-memory", "lots")
    assert r.exit_code == 1
    assert "memory size 'lots' is not understood; give a number with a unit such as 512MB" in r.output


def test_max_batch_below_two_is_refused() -> None:
    r = _run("--model", "smollm2-135m", "--max-batch", "1")
    assert r.exit_code == 2 and "--max-batch" in r.output


def test_a_model_or_an_sae_is_needed() -> None:
    r = _run()
    assert r.exit_code == 2 and "give --model" in r.output


def test_help_names_the_safety_options() -> None:
    r = _run("--help")
    assert r.exit_code == 0
    for opt in ("--host", "--api-key", "--sae-memory", "--max-batch", "--max-queue", "--max-edits"):
        assert opt in r.output
    assert "127.0.0.1" in r.output


def test_a_bad_preset_is_one_line_before_the_model_loads(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('[{"sae": "demo", "feature": 1, "mode": "boost", "value": 1}]')
    r = _run("--model", "smollm2-135m", "--preset", f"sea={bad}")
    assert r.exit_code == 2 and "steering[0].mode: unknown mode 'boost'" in r.output
    r = _run("--model", "smollm2-135m", "--preset", "nofile")
    assert r.exit_code == 2 and "give NAME=FILE.json" in r.output
    r = _run("--model", "smollm2-135m", "--preset", f"sea={tmp_path / 'missing.json'}")
    assert r.exit_code == 2 and "missing.json" in r.output
