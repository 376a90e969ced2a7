"""Distributed mining runs one job or none (issue 27, item 4): a rank started with other
arguments, another corpus or another SAE stops every rank with one line naming the
difference, before any model work; a corpus that differs only in its middle is caught before
the merge. (Empty example slots no longer exist: store v3 keeps rows only where a feature fired.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamascope_sdk.base.errors import RankMismatchError
from llamascope_sdk.mining.agreement import (
    check_agree,
    file_identity,
    first_difference,
    job_identity,
)

from .mining_worker import DOCS
from .test_mining_distributed import REPO, TIMEOUT, env

# ---------------------------------------------------------------- the rank check, in-process


def test_first_difference_names_the_path():
    a = {"args": {"tokens": 600, "context": 40}, "corpus": [{"bytes": 10}]}
    b = {"args": {"tokens": 500, "context": 40}, "corpus": [{"bytes": 10}]}
    assert first_difference(a, b) == ("args.tokens", 600, 500)
    assert first_difference(a, a) is None
    assert first_difference({"corpus": [{"bytes": 10}]}, {"corpus": [{"bytes": 11}]}) == \
        ("corpus[0].bytes", 10, 11)


def test_every_rank_decides_alike_with_one_line():
    same = {"args": {"tokens": 600}}
    check_agree([same, same, same], "mining job")  # no error
    with pytest.raises(RankMismatchError) as info:
        check_agree([same, same, {"args": {"tokens": 500}}], "mining job")
    msg = str(info.value)
    assert msg == ("rank 2 runs another mining job than rank 0: args.tokens is 500 there, 600 "
                   "on rank 0; every rank stopped before merging anything")
    assert "\n" not in msg and isinstance(info.value, ValueError)


def test_job_identity_is_content_not_path(tmp_path):
    """The same file copied elsewhere (another node) is the same corpus; one byte changed in
    its last MiB is not."""
    text = "\n\n".join(DOCS) * 40000  # > 2 MiB: head and tail are read, not the middle
    a, b = tmp_path / "a" / "c.txt", tmp_path / "b" / "c.txt"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text(text)
    assert file_identity(a) == file_identity(b)
    b.write_text(text[:-1] + "!")
    assert file_identity(a) != file_identity(b)


def test_job_identity_fingerprints_the_sae():
    from .mining_worker import build

    _, _, sae = build()
    one = job_identity({"s": sae}, ["x"], {"tokens": 1})
    with torch.no_grad():
        sae.W_enc.mul_(1.5)
    other = job_identity({"s": sae}, ["x"], {"tokens": 1})
    where = first_difference(one, other)
    assert where is not None and where[0].startswith("saes.s.W_enc")
    assert one["corpus"] == "strings"


# ---------------------------------------------------------------- two real ranks (gloo)


def _run(tmp_path: Path, differ: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    corpus, other = tmp_path / "corpus.txt", tmp_path / "other.txt"
    corpus.write_text("\n\n".join(DOCS) + "\n")
    other.write_text("\n\n".join(reversed(DOCS)) + "\n")
    out = tmp_path / "out.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tests.mining_mismatch_worker", str(out), str(corpus), str(other),
           "--differ", differ]
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    return p, out


@pytest.mark.parametrize(("differ", "line"), [
    ("tokens", "rank 1 runs another mining job than rank 0: args.tokens is 500 there, 600 on "
               "rank 0; every rank stopped before merging anything"),
    ("corpus", "rank 1 runs another mining job than rank 0: the corpus differs (other.txt "
               "there, corpus.txt on rank 0; corpus[0].sha256_ends differs); every rank stopped "
               "before merging anything"),
    ("sae", "rank 1 runs another mining job than rank 0: SAE "),
])
def test_a_rank_with_another_job_stops_every_rank_before_any_forward(tmp_path, differ, line):
    p, out = _run(tmp_path, differ)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if "RankMismatchError: " in ln]
    assert len(errors) == 2, p.stderr[-3000:]  # both ranks, the same line
    for ln in errors:
        assert ln.split("RankMismatchError: ", 1)[1].startswith(line), ln
    assert not out.exists()
    assert not list(tmp_path.glob("out.safetensors.forward*"))  # no model work on any rank


def test_a_corpus_differing_in_the_middle_is_caught_before_the_merge(tmp_path):
    p, out = _run(tmp_path, "middle")
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if "RankMismatchError: " in ln]
    assert len(errors) == 2, p.stderr[-3000:]
    assert all("rank 1 read other tokens than rank 0" in ln for ln in errors), errors
    assert not out.exists()


# ---------------------------------------------------------------- checkpoints (item 10)


def test_finish_removes_the_steps_a_killed_run_left(tmp_path, capsys):
    """A killed run leaves a complete step, a newer incomplete one (one rank's file and an
    atomic write's temporary file): a finished run removes them all, and the folder."""
    from llamascope_sdk.base.dist import Dist
    from llamascope_sdk.mining.checkpoint import Checkpointer

    ckpt = tmp_path / "ckpt"
    done, half = ckpt / "step-000000004", ckpt / "step-000000009"
    for step in (done, half):
        step.mkdir(parents=True)
    for name in ("rank-0.safetensors", "rank-1.safetensors", "meta.json", "COMPLETE"):
        (done / name).write_bytes(b"x" * 100)
    (half / "rank-0.safetensors").write_bytes(b"x" * 100)
    (half / ".rank-1.safetensors.k2j3h4.tmp").write_bytes(b"x" * 50)
    Checkpointer(ckpt, 10, Dist(), {}).finish()
    assert not ckpt.exists()
    assert capsys.readouterr().err == ""


def test_a_step_that_cannot_be_removed_is_named_not_left_silently(tmp_path, capsys,
                                                                  monkeypatch):
    """Before, rmtree(ignore_errors=True) left such a step (815 MB in the campaign) without a
    word. A removal that fails (here: as on a file system where another process still holds a
    file) is named with its size and why."""
    import errno
    import os

    from llamascope_sdk.base.dist import Dist
    from llamascope_sdk.mining import checkpoint
    from llamascope_sdk.mining.checkpoint import Checkpointer

    step = tmp_path / "ckpt" / "step-000000004"
    step.mkdir(parents=True)
    (step / "meta.json").write_bytes(b"x" * 2**20)

    def stuck(path, onerror):
        onerror(os.rmdir, str(path), (OSError, OSError(errno.ENOTEMPTY, "Directory not empty"),
                                      None))

    monkeypatch.setattr(checkpoint.shutil, "rmtree", stuck)
    Checkpointer(tmp_path / "ckpt", 10, Dist(), {}).finish()
    err = capsys.readouterr().err
    assert err == (f"mining: could not remove the checkpoint step {step} (1 MiB): {step}: "
                   "[Errno 39] Directory not empty; delete it by hand\n")
