"""training/run.py: every user error is one ``error:`` line plus a ``hint:`` line, a non-zero
exit and no traceback; ``--debug`` shows the traceback; only real bugs say "bug"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from training import run as run_py  # noqa: E402

from .tiny import tiny_config  # noqa: E402


def _fails(capsys: pytest.CaptureFixture, argv: list[str], *want: str) -> str:
    assert run_py.main(argv) == run_py.USER_ERROR
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), err
    assert "Traceback" not in err and "looks like a bug" not in err, err
    for w in want:
        assert w in err, err
    return err


def test_no_recipe(capsys) -> None:
    _fails(capsys, [], "--sae NAME", "--list")


def test_unknown_recipe_name(capsys) -> None:
    _fails(capsys, ["--sae", "L99R-8x"], "layer 99", "--list")


def test_missing_and_invalid_config_files(capsys, tmp_path: Path) -> None:
    _fails(capsys, ["--config", str(tmp_path / "none.yaml")], "does not exist")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    _fails(capsys, ["--config", str(tmp_path / "bad.yaml")], "bad.yaml", "YAML")
    (tmp_path / "list.json").write_text("[1, 2]")
    _fails(capsys, ["--config", str(tmp_path / "list.json")], "not a mapping")
    tiny_config(tmp_path).save(tmp_path / "ok.yaml")
    text = (tmp_path / "ok.yaml").read_text().replace("lr: 0.001", "lr: .inf")
    (tmp_path / "inf.yaml").write_text(text)
    _fails(capsys, ["--config", str(tmp_path / "inf.yaml")], "lr: Input should be a finite number")


def test_invalid_values(capsys) -> None:
    _fails(capsys, ["--sae", "L15R-8x", "--set", "lr=.inf"], "lr", "finite")
    _fails(capsys, ["--sae", "L15R-8x", "--set", "batch_size=0"], "batch_size")
    _fails(capsys, ["--sae", "L15R-8x", "--set", "nonsense=1"], "nonsense")


def test_missing_data_file(capsys, tmp_path: Path) -> None:
    _fails(capsys, ["--sae", "L15R-8x", "--set", f"dataset={tmp_path / 'gone.txt'}"],
           "gone.txt", "--set dataset=")
    _fails(capsys, ["--sae", "L15R-8x", "--set", f"activation_cache={tmp_path}"],
           "not an activation cache", "--make-cache")


@pytest.mark.parametrize("device", ["cuda", "mps", "tpu"])
def test_unavailable_device(capsys, device: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _fails(capsys, ["--sae", "L15R-8x", "--device", device], device, "use --device cpu")


def test_a_real_bug_says_so_and_debug_shows_the_traceback(capsys, monkeypatch) -> None:
    def broken(args):  # noqa: ANN001, ANN202
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(run_py, "resolve_configs", broken)
    assert run_py.main(["--sae", "L15R-8x"]) == 1
    err = capsys.readouterr().err
    assert "error: unexpected ZeroDivisionError: boom" in err and "looks like a bug" in err
    with pytest.raises(ZeroDivisionError):
        run_py.main(["--sae", "L15R-8x", "--debug"])


def test_subprocess_prints_two_lines_and_exits_2(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "training/run.py"), "--config",
                          str(tmp_path / "nope.yaml")], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("error: recipe file") and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 2
