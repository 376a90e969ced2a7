"""Training checkpoints: safetensors for tensors, JSON for scalars, no pickle anywhere.

A checkpoint is a folder ``step-000123/`` holding::

    model.safetensors      every SAE's parameters, keys "<i>.<param>"
    optim.safetensors      Adam exp_avg / exp_avg_sq per parameter, "<i>.<param>.<slot>"
    stats.safetensors      per-SAE feature statistics + the torch RNG state
    buffer-rank<r>.safetensors   the unconsumed shuffle-buffer rows + buffer RNG, per rank
    state.json             step, Adam/scheduler scalars, norms, data position per rank

It is written into ``.step-000123.tmp`` and renamed into place, then ``latest.json`` is
replaced atomically, so SIGKILL at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llamascope_sdk.atomic import atomic_write_text

LATEST = "latest.json"


def tmp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".step-{step:07d}.tmp"


def final_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:07d}"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def commit(run_dir: Path, step: int, keep: int) -> Path:
    """Rename the finished temporary folder into place, point latest.json at it, prune."""
    tmp, final = tmp_dir(run_dir, step), final_dir(run_dir, step)
    for f in tmp.iterdir():  # flush file contents before the rename makes them visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(run_dir / LATEST, json.dumps({"step": step, "dir": final.name}) + "\n")
    done = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in run_dir.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    """The folder of the last committed checkpoint, or None."""
    p = run_dir / LATEST
    if not p.is_file():
        return None
    folder = run_dir / json.loads(p.read_text())["dir"]
    return folder if folder.is_dir() else None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


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
