"""Training checkpoints: safetensors for tensors, JSON for scalars, no pickle anywhere.

A checkpoint is a folder ``step-0000123-w000007/`` (step 123, the 7th checkpoint written in
this run directory) holding::

    model.safetensors      every SAE's parameters, keys "<i>.<param>"
    optim.safetensors      Adam exp_avg / exp_avg_sq per parameter, "<i>.<param>.<slot>"
    stats.safetensors      per-SAE feature statistics
    buffer-rank<r>.safetensors   the unconsumed shuffle-buffer rows + buffer and torch RNG, per rank
    data-rank<r>.json      the data position per rank
    state.json             step, write number, Adam/scheduler scalars, norms, configs

Order of a save, so that a SIGKILL at any moment loses nothing:

1. every file is written into ``.step-0000123-w000007.tmp/`` and flushed;
2. the folder is renamed to its final name, which is new for every save (the write number
   ``w`` grows by one per save), so re-saving a step never touches the folder it replaces;
3. ``latest.json`` is replaced atomically to name the new folder;
4. only then are old checkpoints pruned: the ``keep`` most recently *written* ones stay (not the
   highest steps: a ``--no-resume`` run keeps its own new checkpoints), and the one
   ``latest.json`` names is never removed.

Resuming (:func:`candidates` + :func:`read`) tries checkpoints newest-written first and takes
the first intact one: every file present, every safetensors file readable, every tensor
finite. ``latest.json`` must name a folder inside the run directory; anything else is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llamascope_sdk.base.atomic import atomic_write_text
from llamascope_sdk.training.errors import CheckpointError

LATEST = "latest.json"
MODEL, OPTIM, STATS, STATE = "model.safetensors", "optim.safetensors", "stats.safetensors", "state.json"
#: ``step-<step>-w<write number>``; ``step-<step>`` is the older layout (write number -1).
_NAME = re.compile(r"^step-(\d{7,})(?:-w(\d{6,}))?$")
_TMP = re.compile(r"^\.step-\d{7,}-w\d{6,}\.tmp$")


class Unusable(Exception):
    """A checkpoint folder that is incomplete, unreadable or holds non-finite values."""


@dataclass(frozen=True)
class Entry:
    """A committed checkpoint folder."""

    folder: Path
    step: int
    seq: int  # write number: larger = written later


@dataclass
class Checkpoint:
    """Everything one rank needs to resume, read and verified by :func:`read`."""

    folder: Path
    state: dict[str, Any]
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    buffer: dict[str, torch.Tensor]
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.state["step"])


def buffer_file(rank: int) -> str:
    return f"buffer-rank{rank}.safetensors"


def data_file(rank: int) -> str:
    return f"data-rank{rank}.json"


def final_name(step: int, seq: int) -> str:
    return f"step-{step:07d}-w{seq:06d}"


def tmp_dir(run_dir: Path, step: int, seq: int) -> Path:
    return Path(run_dir) / f".{final_name(step, seq)}.tmp"


# ----------------------------------------------------------------------------- listing
def _parse(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)) if m.group(2) is not None else -1


def checkpoints(run_dir: Path) -> list[Entry]:
    """Committed checkpoint folders, most recently written first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for p in run_dir.iterdir():
        parsed = _parse(p.name)
        if parsed is not None and p.is_dir() and not p.is_symlink():
            out.append(Entry(p, *parsed))
    return sorted(out, key=lambda e: (e.seq, e.step), reverse=True)


def next_seq(run_dir: Path) -> int:
    """The write number of the next save: one more than any folder (committed or not) uses."""
    run_dir = Path(run_dir)
    seqs = [e.seq for e in checkpoints(run_dir)]
    if run_dir.is_dir():
        seqs += [int(p.name.rsplit("-w", 1)[1][:-4]) for p in run_dir.iterdir() if _TMP.match(p.name)]
    return max(seqs, default=0) + 1


def read_pointer(run_dir: Path) -> Path | None:
    """The folder ``latest.json`` names, or None without a pointer.

    Raises:
        CheckpointError: the pointer is not JSON, or names something that is not a checkpoint
            folder directly inside ``run_dir`` (``../x``, an absolute path, a symlink out).
    """
    run_dir = Path(run_dir)
    p = run_dir / LATEST
    if not p.is_file():
        return None
    hint = (f"delete {p} (resuming then takes the newest intact step-* folder) or start over "
            "with --no-resume")
    try:
        name = json.loads(p.read_text())["dir"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{p} is not a checkpoint pointer ({exc})", hint=hint) from None
    if not isinstance(name, str) or _parse(name) is None:
        raise CheckpointError(f"{p} names {name!r}, which is not a checkpoint folder of this run "
                              f"(expected step-NNNNNNN-wNNNNNN inside {run_dir})", hint=hint)
    folder = run_dir / name
    if folder.is_symlink() or folder.resolve().parent != run_dir.resolve():
        raise CheckpointError(f"{p} names {name!r}, which leads outside {run_dir}", hint=hint)
    return folder


def candidates(run_dir: Path) -> list[Entry]:
    """Checkpoints to try when resuming, in order (checks the pointer on the way)."""
    read_pointer(run_dir)
    return checkpoints(run_dir)


# ----------------------------------------------------------------------------- writing
def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def save_json(obj: Any, path: Path) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def begin(tmp: Path) -> None:
    """Create the temporary folder of a save (rank 0), removing unfinished ones first."""
    run_dir = tmp.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.iterdir():
        if _TMP.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    os.mkdir(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, keep: int) -> Path:
    """Rename the finished temporary folder to its final name, point latest.json at it, prune."""
    run_dir = tmp.parent
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        _fsync(f)
    final = run_dir / tmp.name[1:-len(".tmp")]
    if final.exists():  # write numbers are unique: a folder of this name is never replaced
        raise CheckpointError(f"{final} already exists; two processes are writing {run_dir}?")
    os.replace(tmp, final)
    _fsync(run_dir)
    step, seq = _parse(final.name)  # type: ignore[misc]
    atomic_write_text(run_dir / LATEST, json.dumps({"step": step, "dir": final.name,
                                                    "seq": seq}) + "\n")
    prune(run_dir, keep, protect=final)
    return final


def prune(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Remove all but the ``keep`` most recently written checkpoints; ``protect`` always stays."""
    for e in checkpoints(run_dir)[max(keep, 1):]:
        if protect is None or e.folder.name != protect.name:
            shutil.rmtree(e.folder, ignore_errors=True)


# ----------------------------------------------------------------------------- reading
def _load(folder: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(folder / name))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise Unusable(f"{name} cannot be read ({type(exc).__name__}: {exc})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise Unusable(f"{name} holds NaN/inf values (in {', '.join(bad[:3])})")
    return tensors


def _json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError) as exc:
        raise Unusable(f"{name} cannot be read ({exc})") from None


def read(folder: Path, rank: int = 0, world: int = 1) -> Checkpoint:
    """Read and verify what ``rank`` needs from a checkpoint folder.

    Raises:
        Unusable: a file is missing or unreadable, or a tensor is not finite.
        CheckpointError: the checkpoint is intact but was written by another number of ranks.
    """
    state = _json(folder, STATE)
    if not isinstance(state, dict) or "step" not in state or "saes" not in state:
        raise Unusable(f"{STATE} lacks step/saes")
    if state.get("world", 1) != world:
        raise CheckpointError(f"checkpoint {folder} was written by {state.get('world')} ranks; "
                              f"resume with the same number (got {world})",
                              hint=f"run with --nproc_per_node {state.get('world')}, or --no-resume")
    need = [MODEL, OPTIM, STATS, STATE] + [f for r in range(world)
                                           for f in (buffer_file(r), data_file(r))]
    missing = [n for n in need if not (folder / n).is_file()]
    if missing:
        raise Unusable(f"missing {', '.join(missing)}")
    return Checkpoint(folder, state, _load(folder, MODEL), _load(folder, OPTIM),
                      _load(folder, STATS), _load(folder, buffer_file(rank)),
                      _json(folder, data_file(rank)))


# ----------------------------------------------------------------------------- optimiser
def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str,
                         names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state into tensors (safetensors) and scalars (json)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "step": {}}
    for idx, st in sd["state"].items():
        for slot, v in st.items():
            if slot == "step":
                scalars["step"][str(idx)] = float(v)
            else:
                tensors[f"{prefix}{names[idx]}.{slot}"] = v
    return tensors, scalars


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           scalars: dict[str, Any], prefix: str, names: list[str]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for sidx, step in scalars["step"].items():
        idx = int(sidx)
        slots = {k.rsplit(".", 1)[1]: v for k, v in tensors.items()
                 if k.startswith(f"{prefix}{names[idx]}.")}
        state[idx] = {"step": torch.tensor(step, dtype=torch.float32), **slots}
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
