"""The runnable examples stay runnable: each one runs offline on the demo SAE and SmolLM2, every
command their docstrings document runs as written (the ones that need Llama-3.1-8B excepted; a
placeholder path gets the one-line missing-file error), each reports a user error in one line
like the CLI, and each imports only names the package exports."""

from __future__ import annotations

import ast
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import llamascope_sdk

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
#: Placeholders the examples' docstrings use for the user's own files.
PLACEHOLDER = "path/to/"


def _run(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    if ok:
        assert p.returncode == 0, p.stderr[-2000:]
    return p


def _assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 1, no traceback, and exactly one ``error: `` line naming ``needles``, followed
    at most by one ``hint: `` line (progress bars may come before it)."""
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if ln.startswith("error: ")]
    assert len(errors) == 1, lines
    tail = lines[errors[0]:]
    assert len(tail) == 1 or (len(tail) == 2 and tail[1].startswith("hint: ")), tail
    for needle in needles:
        assert needle in tail[0], (needle, tail[0])


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


def test_documented_commands_are_found() -> None:
    cmds = [" ".join(c) for c in _documented_commands()]
    assert any(c.startswith("examples/04_evaluate.py path/to/") for c in cmds), cmds
    assert any(c.startswith("examples/02_steer_generation.py") for c in cmds), cmds


@pytest.mark.smollm
@pytest.mark.parametrize("argv", _documented_commands(), ids=" ".join)
def test_documented_example_commands_run(argv: list[str]) -> None:
    """As written; a placeholder for the user's file gets the one-line missing-file error."""
    if "02_" in argv[0]:  # keep generation short (the last --max-new-tokens wins)
        argv = [*argv, "--max-new-tokens", "6"]
    placeholders = [a for a in argv if a.startswith(PLACEHOLDER)]
    p = _run(Path(argv[0]).name, *argv[1:], ok=not placeholders)
    if placeholders:
        _assert_one_line_error(p, placeholders[0], "does not exist")


#: A user error for every example (checked to cover all of them), and what its line names.
USER_ERRORS = {
    "01_load_and_encode.py": (["--sae", "no-such-sae"], ["unknown Llama Scope SAE", "no-such-sae"]),
    "02_steer_generation.py": (["--feature", "999999", "--max-new-tokens", "2"],
                               ["feature index 999999 is out of range"]),
    "03_splice_and_ablate.py": (["--sae", "no-such-sae"], ["unknown Llama Scope SAE"]),
    "04_evaluate.py": (["missing.txt", "--tokens", "40"], ["missing.txt", "does not exist"]),
    "05_llama_scope_transcoder.py": (["--width", "3x", "--device", "cpu"], ["unknown width '3x'"]),
}


def test_every_example_has_a_user_error_case() -> None:
    assert sorted(USER_ERRORS) == sorted(f.name for f in EXAMPLES.glob("*.py"))


@pytest.mark.parametrize("script", [
    pytest.param(s, marks=pytest.mark.smollm) if s.startswith(("02_", "04_")) else s
    for s in sorted(USER_ERRORS)])  # 02 and 04 load SmolLM2 before their error
def test_example_user_error_is_one_line(script: str) -> None:
    args, needles = USER_ERRORS[script]
    _assert_one_line_error(_run(script, *args, ok=False), *needles)


def test_examples_import_only_names_the_package_exports() -> None:
    for f in sorted(EXAMPLES.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llamascope_sdk"):
                assert node.module == "llamascope_sdk", (f.name, node.module)
                for alias in node.names:
                    assert alias.name in llamascope_sdk.__all__, (f.name, alias.name)
                    assert getattr(llamascope_sdk, alias.name) is not None
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("llamascope_sdk") for a in node.names), f.name


@pytest.mark.smollm
def test_load_and_encode() -> None:
    out = _run("01_load_and_encode.py").stdout
    assert "mean L0 over non-special tokens" in out and "#" in out


@pytest.mark.smollm
def test_steer_generation() -> None:
    out = _run("02_steer_generation.py", "--max-new-tokens", "8").stdout
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["baseline"].strip() != lines["steered"].strip()


@pytest.mark.smollm
def test_splice_and_ablate() -> None:
    out = _run("03_splice_and_ablate.py").stdout
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    clean = float(rows["clean loss"].split()[2])
    assert float(rows["spliced, with error term"].split()[4]) == pytest.approx(clean, abs=1e-4)


@pytest.mark.smollm
def test_evaluate(corpus_dir: Path) -> None:
    out = _run("04_evaluate.py", str(corpus_dir / "wikitext2-valid.txt"), "--tokens", "60",
               "--context", "32").stdout
    assert '"l0_mean"' in out and '"delta_lm_loss"' in out
