"""A run SIGKILL-ed between checkpoints and resumed ends with the same weights (CPU)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("tiny_run.py")


def _final(folder: Path) -> dict[str, torch.Tensor]:
    run_dir = folder / "runs" / "tiny-L1R"
    latest = json.loads((run_dir / "latest.json").read_text())
    assert latest["step"] == 40
    return load_file(str(run_dir / latest["dir"] / "model.safetensors")) | load_file(
        str(run_dir / latest["dir"] / "optim.safetensors"))


def test_sigkill_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    subprocess.run([sys.executable, str(SCRIPT), str(a)], check=True, cwd=ROOT, timeout=120)
    killed = subprocess.run([sys.executable, str(SCRIPT), str(b), "--kill-at", "15"], cwd=ROOT,
                            timeout=120)
    assert killed.returncode == -signal.SIGKILL
    latest = json.loads((b / "runs" / "tiny-L1R" / "latest.json").read_text())
    assert latest["step"] == 10  # checkpoint_every=10: the kill came after step 15
    subprocess.run([sys.executable, str(SCRIPT), str(b)], check=True, cwd=ROOT, timeout=120)
    wa, wb = _final(a), _final(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
