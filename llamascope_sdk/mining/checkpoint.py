"""Resumable mining: the running state is saved atomically every N tokens, and a run started
again with the same arguments continues from the last complete checkpoint.

Layout of the checkpoint folder (one per run; :func:`default_checkpoint_dir` keys it by
everything that changes the result)::

    step-000000041/rank-0.safetensors   every tracker's tensors after batch 41, rank 0
    step-000000041/rank-1.safetensors   ... one file per rank (torchrun)
    step-000000041/meta.json            batch index, token and document counts, the run identity
    step-000000041/COMPLETE             written by rank 0 after every rank saved (barrier)

A step without ``COMPLETE`` (a run killed while saving) is ignored; older steps are removed once
a newer one is complete, and the whole folder when mining finishes. Every rank decides when to
save from the token count of all batches (which every rank sees), so all save the same step.
With several nodes the folder must be on a file system they share.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.base.dist import Dist
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.base.paths import cache_root
from llamascope_sdk.mining.state import Tracker


def default_checkpoint_dir(identity: Mapping[str, Any]) -> Path:
    """``$LLAMASCOPE_CACHE/mining-checkpoints/<hash of the run's identity>``."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "mining-checkpoints" / h


_STEP = re.compile(r"step-\d{9}")
#: what after_batch writes into a step (atomic.py's temporary files included)
_OWN_FILE = re.compile(r"rank-\d+\.safetensors|meta\.json|COMPLETE|\..+\.tmp")


class Checkpointer:
    def __init__(self, folder: Path, every: int, dist: Dist, identity: Mapping[str, Any]) -> None:
        self.folder, self.every, self.dist = Path(folder).expanduser(), every, dist
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self.since = 0

    def _steps(self) -> list[Path]:
        """The step folders this class wrote: ``step-<9 digits>`` holding only its own files,
        so that nothing else in a user's --checkpoint-dir (a training run's ``step-...-w...``
        folders, say) is ever read or removed."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir()
                      if p.is_dir() and _STEP.fullmatch(p.name)
                      and all(_OWN_FILE.fullmatch(f.name) for f in p.iterdir()))

    def resume(self, trackers: Mapping[str, Tracker]) -> tuple[int, int, int]:
        """Load the newest complete step; (last batch done, tokens, documents) or (-1, 0, 0)."""
        for step in reversed(self._steps()):
            if not (step / "COMPLETE").is_file():
                continue
            meta = json.loads((step / "meta.json").read_text(encoding="utf-8"))
            if meta.get("identity") != self.identity or meta.get("world") != self.dist.world:
                raise InputError(
                    f"{self.folder} holds a checkpoint of a different mining run (other SAEs, "
                    f"corpus, arguments or number of ranks: {meta.get('world')}); use another "
                    "checkpoint folder or delete that one")
            from safetensors.torch import load_file

            t = load_file(str(step / f"rank-{self.dist.rank}.safetensors"))
            for name, tr in trackers.items():
                tr.load({k.split("/", 1)[1]: v for k, v in t.items() if k.split("/", 1)[0] == name})
            if self.dist.is_main:
                sys.stderr.write(f"mining: resuming from {step} ({meta['n_tokens']:,} tokens "
                                 "done)\n")
            return int(meta["batch"]), int(meta["n_tokens"]), int(meta["n_docs"])
        return -1, 0, 0

    def after_batch(self, i: int, n: int, trackers: Mapping[str, Tracker], n_tokens: int,
                    n_docs: int) -> None:
        self.since += n
        if self.since < self.every:
            return
        self.since = 0
        step = self.folder / f"step-{i:09d}"
        step.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}/{k}": v.detach().to("cpu", copy=True)
                   for name, tr in trackers.items() for k, v in tr.tensors().items()}
        atomic_save_safetensors(tensors, step / f"rank-{self.dist.rank}.safetensors")
        self.dist.barrier()
        if self.dist.is_main:
            atomic_write_text(step / "meta.json", json.dumps(
                {"batch": i, "n_tokens": n_tokens, "n_docs": n_docs, "world": self.dist.world,
                 "identity": self.identity}, sort_keys=True) + "\n")
            atomic_write_text(step / "COMPLETE", "")
            # only older steps: a newer one is an incomplete leftover of a killed run that the
            # other ranks are about to write into again (removing it raced with their writes)
            for old in self._steps():
                if old.name < step.name:
                    shutil.rmtree(old, ignore_errors=True)

    def finish(self) -> None:
        """Mining is done: remove the steps (and the folder if nothing else is in it)."""
        self.dist.barrier()
        if self.dist.is_main:
            for old in self._steps():
                shutil.rmtree(old, ignore_errors=True)
            if self.folder.is_dir() and not any(self.folder.iterdir()):
                self.folder.rmdir()


__all__ = ["Checkpointer", "default_checkpoint_dir"]
