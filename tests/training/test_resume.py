"""Real SIGKILLs: between checkpoints, and in the middle of writing one. Every resumed run ends
with the same weights as an uninterrupted one (CPU, bit-identical)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("tiny_run.py")


@pytest.fixture(scope="module")
def model_dir(tiny_llama, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    a = tmp_path_factory.mktemp("uninterrupted")
    _run(a, model_dir)
    return _final(a)


def _run(folder: Path, model: Path, *extra: str, killed: bool = False) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), str(folder), str(model), *extra], cwd=ROOT,
                         timeout=180, capture_output=True, text=True)
    if killed:
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    else:
        assert res.returncode == 0, res.stderr[-2000:]


def _pointer(folder: Path) -> dict:
    run_dir = folder / "runs" / "tiny-L1R"
    latest = json.loads((run_dir / "latest.json").read_text())
    assert (run_dir / latest["dir"]).is_dir(), latest  # never names a missing folder
    return latest


def _final(folder: Path) -> dict[str, torch.Tensor]:
    latest = _pointer(folder)
    assert latest["step"] == 40
    d = folder / "runs" / "tiny-L1R" / latest["dir"]
    return load_file(str(d / "model.safetensors")) | load_file(str(d / "optim.safetensors"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigkill_between_checkpoints_resumes_bit_identically(tmp_path, model_dir, reference) -> None:
    _run(tmp_path, model_dir, "--kill-at", "15", killed=True)
    assert _pointer(tmp_path)["step"] == 10  # checkpoint_every=10: the kill came after step 15
    _run(tmp_path, model_dir)
    _same(_final(tmp_path), reference)


# the file operations of a save: 1-2 mkdir, 3-8 the six files, 9 the folder rename,
# 10 mkdir (atomic write), 11 the latest.json switch, 12 pruning the older checkpoint
@pytest.mark.parametrize("op", [3, 9, 11, 12])
def test_sigkill_inside_a_save_resumes_bit_identically(tmp_path, model_dir, reference, op) -> None:
    """The save of step 20 is SIGKILLed at its op-th file operation: the run resumes from step
    10 or 20 (the newest complete folder, even before latest.json names it) and finishes with
    the reference weights."""
    _run(tmp_path, model_dir, "--kill-save", "20", "--kill-op", str(op), killed=True)
    assert _pointer(tmp_path)["step"] in (10, 20)
    _run(tmp_path, model_dir)
    _same(_final(tmp_path), reference)
