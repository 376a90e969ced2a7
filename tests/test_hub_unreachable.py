"""An unreachable Hub fails at once, with one error that says what is cached for this SAE and
what would help, and without huggingface_hub's pages of retry logs."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import DownloadError, HubUnreachableError
from llamascope_sdk.loading.hub import fetch_hyperparams

from .fakehub import fake_hub_fixture, set_offline  # noqa: F401  (fixture)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


def assert_quiet(err: str) -> None:
    for spam in ("Retrying", "Retry ", "thrown while requesting", "Traceback", "No local file found"):
        assert spam not in err, err
    assert len(err.strip().splitlines()) <= 1, err


def test_cold_cache_fails_within_5_s_with_one_clear_error(monkeypatch, tmp_path: Path, capfd) -> None:
    """Real huggingface_hub timings (no patched sleep): before, ~23 s of retries."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("LLAMASCOPE_CACHE", str(tmp_path / "ls"))
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(key, raising=False)
    capfd.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError) as exc:
        SAE.from_pretrained("L12M-128k")
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed
    err = exc.value
    assert isinstance(err, DownloadError) and isinstance(err, ConnectionError)
    msg, hint = str(err), err.hint or ""
    assert "\n" not in msg and "\n" not in hint
    assert msg.startswith(f"could not reach the Hub at {endpoint} to download L12M-128k (L12M-32x)")
    assert "ConnectError" in msg and f"no copy of L12M-128k (L12M-32x) in {tmp_path / 'hf'}" in msg
    assert "HF_ENDPOINT" in hint and "HF_HUB_CACHE" in hint
    assert "HF_HUB_OFFLINE" not in hint  # offline mode cannot help: nothing is cached
    assert_quiet(capfd.readouterr().err)
    print(f"unreachable Hub, cold cache: failed after {elapsed:.2f} s")


def test_fetch_hyperparams_fails_fast_too(monkeypatch, tmp_path: Path, capfd) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError, match="no copy of L3R-8x"):
        fetch_hyperparams("L3R-8x")
    assert time.perf_counter() - t0 < 5.0
    assert_quiet(capfd.readouterr().err)


def test_other_revision_cached_says_which_and_how_to_use_it(fake_hub, monkeypatch, capfd) -> None:
    old = fake_hub.commits["R-old"]
    SAE.from_pretrained("L12R-8x", revision="v0")  # only the old commit is cached
    fake_hub.hub.stop()
    capfd.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError) as exc:
        SAE.from_pretrained("L12R-8x")  # main: not cached
    assert time.perf_counter() - t0 < 5.0
    msg, hint = str(exc.value), exc.value.hint or ""
    assert "revision 'main'" in msg and f"at commit {old[:12]} (revision 'v0')" in msg
    assert "Llama3_1Base-L12R-8x" in msg and "without its weights" not in msg
    assert "HF_HUB_OFFLINE=1" in hint and "revision='v0'" in hint and "HF_ENDPOINT" in hint
    assert_quiet(capfd.readouterr().err)
    set_offline(monkeypatch)  # what the hint says works
    sae = SAE.from_pretrained("L12R-8x", revision="v0")
    assert sae.source.commit == old


def test_weights_not_cached_says_so_and_does_not_suggest_offline(fake_hub, capfd) -> None:
    fetch_hyperparams("L12R-8x")  # hyperparams.json only
    fake_hub.hub.stop()
    capfd.readouterr()
    with pytest.raises(HubUnreachableError) as exc:
        SAE.from_pretrained("L12R-8x")
    assert f"at commit {fake_hub.commits['R-new'][:12]} (revision 'main') without its weights" in str(exc.value)
    assert "HF_HUB_OFFLINE" not in (exc.value.hint or "")
    assert_quiet(capfd.readouterr().err)


def test_refused_connection_is_not_retried_but_a_cut_one_is_resumed(fake_hub, monkeypatch) -> None:
    """Range-resume retries are for a server that answered; a refused HEAD is asked once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    fake_hub.hub.cut_after["checkpoints/final.safetensors"] = 10_000
    SAE.from_pretrained("L12R-8x")
    assert len(fake_hub.hub.requests("final.safetensors", "GET")) == 2  # cut, then resumed
    import llamascope_sdk.loading.hub as hub_mod

    calls: list[str] = []
    real = hub_mod._probe
    monkeypatch.setattr(hub_mod, "_probe", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    fake_hub.hub.stop()
    with pytest.raises(HubUnreachableError):
        SAE.from_pretrained("L12R-8x", revision="v0")
    assert len(calls) == 1


def test_load_model_unreachable_fails_fast_without_retry_logs(monkeypatch, tmp_path: Path, capfd) -> None:
    from llamascope_sdk.loading.models import load_model

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    capfd.readouterr()
    t0 = time.perf_counter()
    with pytest.raises(HubUnreachableError, match=f"could not load model 'someone/model': could not reach the Hub at {endpoint} for someone/model") as exc:
        load_model("someone/model")
    assert time.perf_counter() - t0 < 5.0
    assert "HF_ENDPOINT" in (exc.value.hint or "") and "smollm2-135m" in (exc.value.hint or "")
    assert_quiet(capfd.readouterr().err)


def test_load_model_connection_error_behind_transformers_is_classified(fake_hub, monkeypatch) -> None:
    """If the Hub goes away between the quick check and transformers' own requests, the
    OSError transformers raises is classified by the huggingface_hub error class behind it."""
    import llamascope_sdk.loading.hub as hub_mod
    from llamascope_sdk.loading.models import load_model

    monkeypatch.setattr(hub_mod, "check_reachable", lambda *a, **k: None)
    fake_hub.hub.stop()
    with pytest.raises(HubUnreachableError, match="could not load model 'someone/model': could not reach the Hub"):
        load_model("someone/model")
