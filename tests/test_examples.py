"""The runnable examples stay runnable: each one runs offline on the demo SAE and SmolLM2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    p = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


@pytest.mark.smollm
def test_load_and_encode() -> None:
    out = _run("01_load_and_encode.py")
    assert "mean L0 over non-special tokens" in out and "#" in out


@pytest.mark.smollm
def test_steer_generation() -> None:
    out = _run("02_steer_generation.py", "--max-new-tokens", "8")
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["baseline"].strip() != lines["steered"].strip()


@pytest.mark.smollm
def test_splice_and_ablate() -> None:
    out = _run("03_splice_and_ablate.py")
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    clean = float(rows["clean loss"].split()[2])
    assert float(rows["spliced, with error term"].split()[4]) == pytest.approx(clean, abs=1e-4)


@pytest.mark.smollm
def test_evaluate(tmp_path) -> None:
    text = tmp_path / "t.txt"
    text.write_text(" = Rome = \n\nRome is the capital of Italy. It is old and has many churches.\n" * 3)
    out = _run("04_evaluate.py", str(text), "--tokens", "60", "--context", "32")
    assert '"l0_mean"' in out and '"delta_lm_loss"' in out
