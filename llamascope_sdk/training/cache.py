"""On-disk activation cache: safetensors shards written atomically, read back as chunks.

Layout of a cache folder::

    manifest.json              hook points, d_model, dtype, shard list, tokens, source info
    shard-00000.safetensors    one tensor per hook point [n, D] + tokens/doc/pos [n]

Each shard is written to a temporary file and renamed, and the manifest is rewritten
(atomically) after every shard, so a killed caching run leaves a readable cache that
``write_cache(..., resume=True)`` continues. Caching pays off for sweeps on a few sites; for
all 128 Llama-3.1-8B sites it would be ~1 PB per billion tokens (peers 5.3), hence live mode.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from llamascope_sdk.base.atomic import atomic_save_safetensors, atomic_write_text
from llamascope_sdk.training.activations import Chunk, LiveSource

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def _flush(folder: Path, parts: list[Chunk], manifest: dict[str, Any]) -> None:
    shard = {k: torch.cat([p[k] for p in parts]).contiguous() for k in parts[0]}
    name = f"shard-{len(manifest['shards']):05d}.safetensors"
    atomic_save_safetensors(shard, folder / name)
    manifest["shards"].append({"file": name, "tokens": int(shard["tokens"].numel())})
    manifest["tokens"] += int(shard["tokens"].numel())
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def write_cache(source: LiveSource, folder: str | Path, *, max_tokens: int | None = None,
                shard_tokens: int = 65_536, info: dict[str, Any] | None = None,
                resume: bool = True, progress: bool = True,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Generate activations with ``source`` and store them as shards in ``folder``.

    Returns:
        The manifest. With ``resume`` an existing partial cache is continued from its
        recorded document position.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = source.generator
    manifest: dict[str, Any] = {
        "format": "llamascope-activation-cache-v1", "hook_points": gen.hook_points,
        "dtype": str(dtype).removeprefix("torch."), "shards": [], "tokens": 0,
        "source_state": source.state_dict(), "complete": False, "info": info or {}}
    if resume and (folder / MANIFEST).is_file():
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("complete"):
            return manifest
        source.load_state_dict(manifest["source_state"])
    parts: list[Chunk] = []
    n_parts = 0
    t0, done0 = time.time(), manifest["tokens"]
    done = max_tokens is not None and manifest["tokens"] >= max_tokens
    for chunk in ([] if done else source):
        for h in gen.hook_points:  # activations stored in bf16 by default, as the recipe ran
            chunk[h] = chunk[h].to(dtype)
        parts.append(chunk)
        n_parts += chunk["tokens"].numel()
        if n_parts >= shard_tokens:
            manifest["source_state"] = source.state_dict()
            _flush(folder, parts, manifest)
            parts, n_parts = [], 0
            if progress:
                rate = (manifest["tokens"] - done0) / max(time.time() - t0, 1e-9)
                log.info("cache: %s tokens, %s tok/s", f"{manifest['tokens']:,}", f"{rate:,.0f}")
        if max_tokens is not None and manifest["tokens"] + n_parts >= max_tokens:
            break
    if parts:
        manifest["source_state"] = source.state_dict()
        _flush(folder, parts, manifest)
    manifest["complete"] = True
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an activation cache (no {MANIFEST}); build "
                                "one with `python training/run.py ... --make-cache DIR`")
    return json.loads(path.read_text())


class CacheSource:
    """Chunks (one per shard) from a cache folder, ``epochs`` passes, shard order permuted
    per epoch with ``seed``. Rank r of ``world`` reads shards i % world == r ("shard" mode)
    or all of them (``world=1``). State = (epoch, shards done), so resume is exact."""

    def __init__(self, folder: str | Path, *, epochs: int = 1, seed: int = 0, rank: int = 0,
                 world: int = 1, hook_points: list[str] | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(folder)
        missing = set(hook_points or []) - set(self.manifest["hook_points"])
        if missing:
            raise ValueError(f"cache {folder} lacks hook points {sorted(missing)}; it holds "
                             f"{self.manifest['hook_points']}")
        self.keys = hook_points or self.manifest["hook_points"]
        self.epochs, self.seed, self.rank, self.world = epochs, seed, rank, world
        self.epoch, self.done = 0, 0

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(len(self.manifest["shards"]), generator=g).tolist()
        return [s for i, s in enumerate(order) if i % self.world == self.rank]

    def __iter__(self) -> Iterator[Chunk]:
        while self.epoch < self.epochs:
            order = self._order(self.epoch)
            while self.done < len(order):
                entry = self.manifest["shards"][order[self.done]]
                data = load_file(str(self.folder / entry["file"]))
                self.done += 1
                yield {k: data[k] for k in (*self.keys, "tokens")}
            self.epoch, self.done = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.done = int(state["epoch"]), int(state["done"])
