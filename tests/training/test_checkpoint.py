"""Checkpoints lose nothing: a crash at any file operation of a save (or of a re-save of the same
step) leaves a directory from which resuming gives the newest intact checkpoint, exactly;
``latest.json`` never names a missing folder or one outside the run; NaN never reaches disk."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llamascope_sdk.base.dist import Dist
from llamascope_sdk.training import checkpoint as ck
from llamascope_sdk.training.errors import CheckpointError, NonFiniteError
from llamascope_sdk.training.loop import Run

from .tiny import D_MODEL, tiny_config

HOOK = "blocks.1.hook_resid_post"


class NoiseSource:
    """Seeded random activation chunks, resumable by position (no LM needed)."""

    def __init__(self) -> None:
        self.position = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            g = torch.Generator().manual_seed(self.position)
            self.position += 1
            yield {HOOK: torch.randn(64, D_MODEL, generator=g) * 3}

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def _run(cfg) -> Run:  # noqa: ANN001
    return Run([cfg], Dist(), source=NoiseSource())


def _params(run: Run) -> dict[str, torch.Tensor]:
    t = run.saes[0]
    out = {n: p.detach().clone() for n, p in t.sae.named_parameters()}
    for n, p in t.sae.named_parameters():
        out |= {f"{n}.{k}": v.clone() for k, v in t.opt.state.get(p, {}).items() if k != "step"}
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _listing(run_dir: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(run_dir)): p.read_bytes() if p.is_file() else None
            for p in sorted(run_dir.rglob("*"))}


def _pointer_ok(run_dir: Path) -> None:
    p = run_dir / ck.LATEST
    if p.is_file():
        assert (run_dir / json.loads(p.read_text())["dir"]).is_dir(), p.read_text()


class Crashes:
    """Records the directory as a SIGKILL would leave it before every file operation of a save
    (and, for file writes, with the file cut in half after it), without running any cleanup."""

    OPS = [(os, "replace"), (os, "rename"), (os, "mkdir"), (shutil, "rmtree"),
           (ck, "save_file"), (ck, "write_text")]

    def __init__(self, monkeypatch: pytest.MonkeyPatch, run_dir: Path, out: Path) -> None:
        self.run_dir, self.out = run_dir, out
        self.states: list[tuple[str, Path, bool]] = []  # (op, snapshot, new folder in place)
        self.renamed = False
        self.busy = False
        for mod, name in self.OPS:
            monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _snap(self, label: str) -> None:
        dest = self.out / f"{len(self.states):03d}"
        self.busy = True
        try:
            if self.run_dir.exists():
                shutil.copytree(self.run_dir, dest / self.run_dir.name)
            else:
                (dest / self.run_dir.name).mkdir(parents=True)
        finally:
            self.busy = False
        self.states.append((label, dest, self.renamed))

    def _wrap(self, name: str, fn):  # noqa: ANN001, ANN202
        def inner(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            if self.busy:
                return fn(*a, **kw)
            self._snap(f"before {name} {a[0] if name != 'save_file' else a[1]}")
            out = fn(*a, **kw)
            if name == "replace" and Path(a[0]).name.startswith(".step-"):
                self.renamed = True
            if name in ("save_file", "write_text"):  # killed half-way through the write
                path = Path(a[1] if name == "save_file" else a[0])
                data = path.read_bytes()
                path.write_bytes(data[:len(data) // 2])
                self._snap(f"torn {path.name}")
                path.write_bytes(data)
            return out
        return inner


def _check_all(crashes: Crashes, cfg, before: tuple[int, dict] | None,  # noqa: ANN001
               after: tuple[int, dict]) -> None:
    assert len(crashes.states) >= 10
    for label, snap, renamed in crashes.states:
        _pointer_ok(snap / cfg.name)
        run = _run(cfg.model_copy(update={"output_dir": str(snap)}))
        want = after if renamed else before
        if want is None:
            assert not run.load(), label
            continue
        assert run.load(), label
        assert run.step == want[0], label
        _assert_same(_params(run), want[1])


def test_crash_at_every_operation_of_a_save_and_a_resave(tmp_path, monkeypatch) -> None:
    cfg = tiny_config(tmp_path, keep_checkpoints=1)
    run = _run(cfg)
    first = Crashes(monkeypatch, run.run_dir, tmp_path / "first")
    run.fit(max_steps=10, progress=False)  # saves step 10: the very first checkpoint
    p10 = _params(run)
    monkeypatch.undo()
    _check_all(first, cfg, None, (10, p10))

    run.fit(max_steps=9, progress=False)
    run.fit(max_steps=1, progress=False)  # step 20: saved inside fit
    p20 = _params(run)
    assert run.saved_step == 20
    # the save of step 20 again, with crashes everywhere (a re-run of a finished job)
    resave = Crashes(monkeypatch, run.run_dir, tmp_path / "resave")
    run.save()
    monkeypatch.undo()
    _check_all(resave, cfg, (20, p20), (20, p20))
    assert any("rmtree" in label for label, _, _ in resave.states)  # the old step-20 is pruned

    # a save of a new step with keep_checkpoints=1: crashes everywhere
    run.fit(max_steps=5, progress=False)
    nxt = Crashes(monkeypatch, run.run_dir, tmp_path / "next")
    run.save()
    monkeypatch.undo()
    _check_all(nxt, cfg, (20, p20), (25, _params(run)))
    assert [e.step for e in ck.checkpoints(run.run_dir)] == [25]


def test_no_resume_keeps_the_new_run_and_prunes_by_write_order(tmp_path) -> None:
    cfg = tiny_config(tmp_path, keep_checkpoints=1)
    old = _run(cfg)
    old.fit(max_steps=30, progress=False)
    assert [e.step for e in ck.checkpoints(old.run_dir)] == [30]
    new = _run(cfg)
    new.fit(resume=False, max_steps=10, progress=False)
    assert [e.step for e in ck.checkpoints(new.run_dir)] == [10]  # not pruned for step-30
    assert json.loads((new.run_dir / ck.LATEST).read_text())["step"] == 10
    again = _run(cfg)
    assert again.load() and again.step == 10
    _assert_same(_params(again), _params(new))


def test_resume_skips_nan_and_broken_checkpoints_and_says_so(tmp_path, caplog) -> None:
    cfg = tiny_config(tmp_path, keep_checkpoints=3)
    run = _run(cfg)
    run.fit(max_steps=10, progress=False)
    p10 = _params(run)
    run.fit(max_steps=10, progress=False)
    run.fit(max_steps=10, progress=False)
    e30, e20, e10 = ck.checkpoints(run.run_dir)
    model = (e30.folder / ck.MODEL)
    from safetensors.torch import load_file

    bad = load_file(str(model))
    bad["0.W_e"][0, 0] = float("nan")
    save_file(bad, str(model))  # a NaN checkpoint (as older versions wrote)
    (e20.folder / ck.OPTIM).write_bytes(b"\0" * 10)  # unreadable safetensors
    with caplog.at_level(logging.INFO):
        again = _run(cfg)
        assert again.load() and again.step == 10
    _assert_same(_params(again), p10)
    text = caplog.text
    assert "NaN" in text and e30.folder.name in text and e20.folder.name in text
    assert f"resuming from {e10.folder}" in text
    (e10.folder / ck.STATS).unlink()
    with pytest.raises(CheckpointError, match="none can be resumed") as info:
        _run(cfg).load()
    assert "--no-resume" in (info.value.hint or "")


@pytest.mark.parametrize("pointer", ["../x", "/etc", "step-0000010-w000001/../../x", 7])
def test_pointer_outside_the_run_directory_is_refused(tmp_path, pointer) -> None:
    cfg = tiny_config(tmp_path)
    run = _run(cfg)
    run.fit(max_steps=10, progress=False)
    (run.run_dir / ck.LATEST).write_text(json.dumps({"step": 10, "dir": pointer}))
    with pytest.raises(CheckpointError, match="latest.json"):
        _run(cfg).load()


def test_symlinked_pointer_target_is_refused(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    run = _run(cfg)
    run.fit(max_steps=10, progress=False)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (run.run_dir / "step-0000099-w000099").symlink_to(outside)
    (run.run_dir / ck.LATEST).write_text(json.dumps({"step": 99, "dir": "step-0000099-w000099"}))
    with pytest.raises(CheckpointError, match="outside"):
        _run(cfg).load()


def test_non_finite_loss_stops_before_anything_is_written(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    run = _run(cfg)
    run.fit(max_steps=10, progress=False)
    before = _listing(run.run_dir)
    with torch.no_grad():
        run.saes[0].sae.W_e[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="loss"):
        run.fit(max_steps=15, progress=False)
    with pytest.raises(NonFiniteError, match="nothing was written"):
        run.save()
    assert _listing(run.run_dir) == before
    again = _run(cfg)
    assert again.load() and again.step == 10


def test_parameters_going_nan_in_the_last_step_are_not_saved(tmp_path) -> None:
    cfg = tiny_config(tmp_path)
    run = _run(cfg)
    run.fit(max_steps=10, progress=False)
    before = _listing(run.run_dir)
    run.fit(max_steps=3, progress=False)
    run.saes[0].opt.param_groups[0]["lr"] = float("inf")  # as lr=.inf used to
    run.fit(max_steps=1, progress=False)  # loss finite, parameters now NaN
    with pytest.raises(NonFiniteError, match="W_"):
        run.save()
    assert _listing(run.run_dir) == before
