"""Several processes loading one SAE into one empty cache at once (the ranks of a torchrun
job): all succeed with identical, verified weights, and the checkpoint is downloaded once.

Before the lock, they all appended to one ``blobs/<sha>.llamascope-partial`` and about half
the runs failed (416 errors, sha256 mismatches)."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import time
from pathlib import Path
from typing import Any

import pytest

from .fakehub import fake_hub_fixture, main_checkpoint  # noqa: F401  (fixture)

N_PROCS = 4
ROUNDS = 3
CKPT = "checkpoints/final.safetensors"


def _load_worker(rounds: list[tuple[str, str]], barrier: Any, results: Any, unlocked: bool = False) -> None:
    """Runs in a spawned process: at each barrier, load L12R-8x into that round's caches."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import contextlib

    from llamascope_sdk import SAE

    if unlocked:  # only to demonstrate the race by hand: the download without its lock
        import llamascope_sdk.loading.resumable as resumable_mod
        import llamascope_sdk.loading.verification as verification_mod

        def no_lock(*a: Any, **k: Any) -> contextlib.nullcontext[None]:
            return contextlib.nullcontext()

        # the names the code calls: the blob download's lock and the verified record's lock
        resumable_mod.lock_if_writable = no_lock  # type: ignore[assignment]
        verification_mod.lock_if_writable = no_lock  # type: ignore[assignment]
    for i, (hf_cache, ls_cache) in enumerate(rounds):
        barrier.wait(timeout=120)
        os.environ["HF_HUB_CACHE"] = hf_cache
        os.environ["LLAMASCOPE_CACHE"] = ls_cache
        try:
            sae = SAE.from_pretrained("L12R-8x")
            file_sha = hashlib.sha256(Path(sae.source.path, CKPT).read_bytes()).hexdigest()
            tensors = hashlib.sha256()
            for name, t in sorted(sae.state_dict().items()):
                tensors.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
            results.put((i, os.getpid(), "ok", file_sha, tensors.hexdigest(), sae.source.sha256[CKPT]))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            results.put((i, os.getpid(), "error", f"{type(exc).__name__}: {exc}", None, None))


def run_rounds(fake_hub, tmp_path: Path, *, unlocked: bool = False) -> list[dict]:
    """Start N_PROCS spawned workers once; run ROUNDS loads into fresh caches; per round, the
    workers' results and what the fake Hub logged."""
    ctx = mp.get_context("spawn")
    rounds = [(str(tmp_path / f"r{i}" / "hf"), str(tmp_path / f"r{i}" / "ls")) for i in range(ROUNDS)]
    barrier = ctx.Barrier(N_PROCS + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_load_worker, args=(rounds, barrier, results, unlocked), daemon=True)
             for _ in range(N_PROCS)]
    for p in procs:
        p.start()
    out: list[dict] = []
    try:
        for i in range(ROUNDS):
            fake_hub.hub.clear_log()
            barrier.wait(timeout=120)  # every worker imported the SDK and is ready
            t0 = time.perf_counter()
            got = []
            for _ in range(N_PROCS):
                try:
                    got.append(results.get(timeout=60))
                except queue.Empty:
                    pytest.fail(f"round {i}: a worker did not report within 60 s")
            out.append({"results": got, "seconds": time.perf_counter() - t0,
                        "gets": fake_hub.hub.requests(CKPT, "GET"),
                        "served": fake_hub.hub.served_bytes(CKPT),
                        "statuses": [r.status for r in fake_hub.hub.log]})
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return out


def test_four_processes_load_one_sae_into_one_empty_cache(fake_hub, tmp_path: Path) -> None:
    blob, _ = main_checkpoint(fake_hub.hub)
    want = hashlib.sha256(blob.data).hexdigest()  # independent of the SDK
    # ~0.7 s per checkpoint download (66 kB in 2 kB pieces, 20 ms apart): the loads overlap
    fake_hub.hub.slow(chunk=2048, delay=0.02)
    t0 = time.perf_counter()
    rounds = run_rounds(fake_hub, tmp_path)
    total = time.perf_counter() - t0
    for i, r in enumerate(rounds):
        errors = [x for x in r["results"] if x[2] != "ok"]
        assert errors == [], f"round {i}: {errors}"
        assert len({x[1] for x in r["results"]}) == N_PROCS  # four distinct processes
        assert {x[3] for x in r["results"]} == {want}  # the file each loaded, hashed by hashlib
        assert {x[5] for x in r["results"]} == {want}  # what the SDK recorded
        assert len({x[4] for x in r["results"]}) == 1  # identical tensors in all four
        # the checkpoint body was served once per round: one GET, exactly its size, no 416
        assert len(r["gets"]) == 1 and r["served"] == blob.size, (r["gets"], r["served"])
        assert 416 not in r["statuses"]
        cache = tmp_path / f"r{i}" / "hf"
        assert not list(cache.rglob("*.llamascope-partial")) and not list(cache.rglob("*.incomplete"))
    print(f"{N_PROCS} processes x {ROUNDS} rounds: {total:.1f} s in all; per round "
          + ", ".join(f"{r['seconds']:.2f} s" for r in rounds))
