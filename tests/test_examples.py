"""The runnable examples stay runnable: each one runs offline on the demo SAE and SmolLM2, and
every command their docstrings document runs too (the ones that need Llama-3.1-8B excepted)."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _run(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def _documented_commands() -> list[list[str]]:
    """``python examples/...`` lines of the examples' docstrings that run offline."""
    out = []
    for f in sorted(EXAMPLES.glob("*.py")):
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        for line in doc.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("python examples/") and "meta-llama" not in line:
                out.append(shlex.split(line)[1:])
    return out


@pytest.mark.smollm
@pytest.mark.parametrize("argv", _documented_commands(), ids=" ".join)
def test_documented_example_commands_run(argv: list[str], tmp_path: Path) -> None:
    argv = [a if a != "path/to/text.txt" else str(_text(tmp_path)) for a in argv]
    if "--tokens" in argv:  # keep the documented evaluation short
        argv[argv.index("--tokens") + 1] = "60"
    _run(Path(argv[0]).name, *argv[1:], "--max-new-tokens", "6") if "02_" in argv[0] \
        else _run(Path(argv[0]).name, *argv[1:])


def _text(tmp_path: Path) -> Path:
    text = tmp_path / "t.txt"
    text.write_text(" = Rome = \n\nRome is the capital of Italy. It is old and has many churches.\n" * 3)
    return text


@pytest.mark.smollm
def test_load_and_encode() -> None:
    out = _run("01_load_and_encode.py").stdout
    assert "mean L0 over non-special tokens" in out and "#" in out


@pytest.mark.smollm
def test_steer_generation() -> None:
    out = _run("02_steer_generation.py", "--max-new-tokens", "8").stdout
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["baseline"].strip() != lines["steered"].strip()


def test_example_user_error_is_one_line() -> None:
    p = _run("02_steer_generation.py", "--feature", "999999", "--max-new-tokens", "2", ok=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and "feature index 999999 is out of range" in p.stderr


@pytest.mark.smollm
def test_splice_and_ablate() -> None:
    out = _run("03_splice_and_ablate.py").stdout
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    clean = float(rows["clean loss"].split()[2])
    assert float(rows["spliced, with error term"].split()[4]) == pytest.approx(clean, abs=1e-4)


@pytest.mark.smollm
def test_evaluate(tmp_path) -> None:
    out = _run("04_evaluate.py", str(_text(tmp_path)), "--tokens", "60", "--context", "32").stdout
    assert '"l0_mean"' in out and '"delta_lm_loss"' in out
