"""Mining over torch.distributed (2 ranks, gloo on CPU) and killed-and-resumed mining give
exactly the single-process result, tensor for tensor (document indices and positions too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamascope_sdk.mining.mine import mine

from .mining_worker import ARGS, DOCS, EVAL_ARGS, build, eval_tensors, flatten

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "tests.mining_worker", *args]


def single(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.mining_worker", *args]


@pytest.fixture(scope="module")
def reference():
    """One process, in this process, no checkpoints."""
    torch.set_num_threads(1)
    model, tok, sae = build()
    return flatten(mine(model, tok, sae, DOCS, progress=False, **ARGS)[sae.name])


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert int(want["counts"][0]) > 300 and int((want["top.doc"] >= 0).sum()) > 50  # not trivial


def test_two_ranks_over_gloo_equal_one_process(reference, tmp_path):
    out = tmp_path / "two.safetensors"
    p = subprocess.run(torchrun(str(out)), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same(load_file(str(out)), reference)


def run_and_kill(cmd: list[str], ckpt: Path, pid_file: Path) -> None:
    """Start ``cmd``, wait for a complete checkpoint, SIGKILL the process in ``pid_file``."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not list(ckpt.glob("step-*/COMPLETE")):
            assert proc.poll() is None, f"finished before a checkpoint: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.1)
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    steps = sorted(ckpt.glob("step-*"))
    assert steps, "the checkpoint is gone"


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkilled_run_resumes_to_the_uninterrupted_result(reference, tmp_path, ranks):
    out, ckpt = tmp_path / "res.safetensors", tmp_path / "ckpt"
    args = [str(out), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "60"]
    launch = single if ranks == 1 else torchrun
    run_and_kill(launch(*args, "--sleep", "0.4"), ckpt, Path(f"{out}.pid{ranks - 1}"))
    assert not out.exists()
    done = int(sorted(ckpt.glob("step-*"))[-1].name.split("-")[1])
    p = subprocess.run(launch(*args), cwd=REPO, env=env(), capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "mining: resuming from" in p.stderr and done >= 0
    assert_same(load_file(str(out)), reference)
    assert not ckpt.exists()  # removed once mining finished


def test_evaluate_over_two_ranks_equals_one_process(tmp_path):
    """Every metric of evaluate() (zero ablation too) from 2 ranks equals one process's; the
    centred explained variance up to float64 summation order across ranks (see evaluation.py)."""
    from llamascope_sdk.evaluation.evaluate import evaluate

    torch.set_num_threads(1)
    model, tok, sae = build()
    want = eval_tensors(evaluate(model, tok, sae, DOCS, progress=False, **EVAL_ARGS)[sae.name])
    out = tmp_path / "eval.safetensors"
    p = subprocess.run(torchrun(str(out), "--evaluate"), cwd=REPO, env=env(), capture_output=True,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    got = load_file(str(out))
    assert sorted(got) == sorted(want)
    for k in want:
        if k == "explained_variance_centred":
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=0)
        else:
            assert torch.equal(got[k], want[k]), k
    assert int(want["n_tokens"]) > 200 and 0 < float(want["l0_mean"]) < 64
    assert int(want["n_sequences"]) > 8  # several batches on each rank


def test_finish_removes_only_the_steps_mining_wrote(tmp_path):
    """A --checkpoint-dir shared with other things: a training checkpoint (step-...-w...) and a
    step-shaped folder holding a user's file stay byte for byte; mining's own step goes."""
    from llamascope_sdk.base.dist import Dist
    from llamascope_sdk.mining.checkpoint import Checkpointer

    training = tmp_path / "step-0000123-w000007"
    training.mkdir()
    (training / "model.safetensors").write_bytes(b"weights")
    users = tmp_path / "step-000000004"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    ours = tmp_path / "step-000000006"
    ours.mkdir()
    (ours / "rank-0.safetensors").write_bytes(b"")
    (ours / "COMPLETE").write_text("")
    Checkpointer(tmp_path, 10, Dist(), {}).finish()
    assert not ours.exists()
    assert (training / "model.safetensors").read_bytes() == b"weights"
    assert (users / "notes.txt").read_text() == "mine"
