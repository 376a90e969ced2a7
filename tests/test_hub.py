"""SAE.from_pretrained through a loopback fake Hub: pinning, provenance, caching, offline,
fallbacks, tokens, interrupted downloads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import CorruptCheckpointError, DownloadError, SaeNotFoundError
from llamascope_sdk.loading.hub import download

from .fakehub import D_MODEL, fake_hub_fixture, main_checkpoint, set_offline  # noqa: F401  (fixture)
from .helpers import reference_encode

CKPT = "checkpoints/final.safetensors"


def _x(hp: dict, n: int = 6) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, D_MODEL) * hp["dataset_average_activation_norm"]["in"] / 8


def _assert_encode(sae: SAE, hp: dict, raw: dict) -> None:
    x = _x(hp)
    ref = reference_encode(hp, raw, x)
    f = sae.encode(x).double()
    near = (ref.abs() - hp["jump_relu_threshold"]).abs() < 1e-4
    assert ((f > 0) == (ref > 0))[~near].all()
    torch.testing.assert_close(f[~near], ref[~near], rtol=1e-5, atol=1e-5)
    assert (ref > 0).any()


def test_end_to_end_encode_matches_reference(fake_hub) -> None:
    sae = SAE.from_pretrained("L12R-8x")
    _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x"])
    assert sae.ref is not None and sae.ref.name == "L12R-8x"
    src = sae.source
    assert src.repo_id == "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x"
    assert src.subfolder == "Llama3_1-8B-Base-L12R-8x"
    assert src.revision == "main" and src.commit == fake_hub.commits["R-new"]


def test_sha256_recorded_equals_hashlib(fake_hub) -> None:
    sae = SAE.from_pretrained("L12R-8x")
    folder = Path(sae.source.path)
    for name in ("hyperparams.json", "lm_config.json", CKPT):
        assert sae.source.sha256[name] == hashlib.sha256((folder / name).read_bytes()).hexdigest()


def test_only_the_three_files_of_that_sae_are_requested(fake_hub) -> None:
    SAE.from_pretrained("L12R-8x")
    files = {r.path.split("/resolve/")[1].split("/", 1)[1] for r in fake_hub.hub.log}
    assert files == {f"Llama3_1-8B-Base-L12R-8x/{f}" for f in ("hyperparams.json", "lm_config.json", CKPT)}


def test_revision_pin_old_commit_uses_old_folder_and_weights(fake_hub) -> None:
    old = fake_hub.commits["R-old"]
    for rev in (old, "v0"):
        sae = SAE.from_pretrained("L12R-8x", revision=rev)
        assert sae.source.commit == old and sae.source.revision == rev
        assert sae.source.subfolder == "Llama3_1Base-L12R-8x"  # folder fallback at that commit
        _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x@old"])


def test_files_after_hyperparams_are_fetched_at_the_resolved_commit(fake_hub) -> None:
    SAE.from_pretrained("L12R-8x")
    commit = fake_hub.commits["R-new"]
    for r in fake_hub.hub.log:
        if not r.path.endswith("hyperparams.json"):
            assert f"/resolve/{commit}/" in r.path, r.path


def test_second_load_makes_no_weight_request(fake_hub) -> None:
    hub = fake_hub.hub
    SAE.from_pretrained("L12R-8x")
    assert len(hub.requests(CKPT, "GET")) == 1
    hub.clear_log()
    sae = SAE.from_pretrained("L12R-8x")
    assert hub.requests(CKPT) == [] and hub.requests("lm_config.json") == []
    assert [r.method for r in hub.log] == ["HEAD"]  # only "where does main point?"
    _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x"])
    hub.clear_log()
    SAE.from_pretrained("L12R-8x", revision=fake_hub.commits["R-new"])  # pinned sha: no request
    assert hub.log == []


def test_second_load_does_not_rehash(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    import llamascope_sdk.loading.hub as hub_mod

    SAE.from_pretrained("L12R-8x")
    calls: list[str] = []
    real = hub_mod.sha256_file
    monkeypatch.setattr(hub_mod, "sha256_file", lambda p: calls.append(str(p)) or real(p))
    SAE.from_pretrained("L12R-8x")
    assert not any(c.endswith(".safetensors") or "blobs" in c and "json" not in c for c in calls
                   if not c.endswith(".json"))
    assert len(calls) == 2  # the two small JSON files only


def test_offline_warm_cache_works(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    SAE.from_pretrained("L12R-8x")
    fake_hub.hub.clear_log()
    set_offline(monkeypatch)
    sae = SAE.from_pretrained("L12R-8x")
    assert fake_hub.hub.log == []
    assert sae.source.commit == fake_hub.commits["R-new"]
    _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x"])


def test_local_files_only_warm_cache_works(fake_hub) -> None:
    SAE.from_pretrained("L12M-32x")
    fake_hub.hub.clear_log()
    sae = SAE.from_pretrained("L12M-32x", local_files_only=True)
    assert fake_hub.hub.log == [] and sae.source.repo_id.startswith("fnlp/")


def test_offline_cold_cache_is_a_clear_error(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    set_offline(monkeypatch)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE") as exc:
        SAE.from_pretrained("L12R-8x")
    assert "L12R-8x" in str(exc.value) and fake_hub.hub.log == []


def test_hub_unreachable_cold_cache(fake_hub) -> None:
    fake_hub.hub.stop()  # connection refused from now on
    with pytest.raises(DownloadError, match="could not reach") as exc:
        SAE.from_pretrained("L12R-8x")
    assert "HF_ENDPOINT" in (exc.value.hint or "")


def test_hub_unreachable_warm_cache_uses_cache(fake_hub) -> None:
    SAE.from_pretrained("L12R-8x")
    fake_hub.hub.stop()
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.source.commit == fake_hub.commits["R-new"]


def test_org_fallback_to_fnlp(fake_hub) -> None:
    sae = SAE.from_pretrained("L12M-128k")
    assert sae.source.repo_id == "fnlp/Llama3_1-8B-Base-LXM-32x"
    assert sae.source.commit == fake_hub.commits["M32"]
    tried = [r.path for r in fake_hub.hub.requests("hyperparams.json")]
    assert tried[0].startswith("/OpenMOSS-Team/") and tried[-1].startswith("/fnlp/")
    _assert_encode(sae, fake_hub.hp["L12M-32x"], fake_hub.raw["L12M-32x"])


def test_spelled_org_is_tried_first(fake_hub) -> None:
    SAE.from_pretrained("fnlp/Llama3_1-8B-Base-L12M-32x")
    assert fake_hub.hub.requests("hyperparams.json")[0].path.startswith("/fnlp/")


def test_folder_fallback_to_old_spelling(fake_hub) -> None:
    sae = SAE.from_pretrained("L3A-8x")
    assert sae.source.subfolder == "Llama3_1Base-L3A-8x"
    _assert_encode(sae, fake_hub.hp["L3A-8x"], fake_hub.raw["L3A-8x"])


def test_explicit_repo_and_subfolder_used_as_given(fake_hub) -> None:
    name = "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x:Llama3_1Base-L12R-8x"
    sae = SAE.from_pretrained(name, revision="v0")
    assert (sae.source.repo_id, sae.source.subfolder) == tuple(name.split(":"))
    with pytest.raises(SaeNotFoundError, match="Llama3_1Base-L12R-8x"):
        SAE.from_pretrained(name)  # main has only the new spelling, and no fallback is made


def test_local_folder(fake_hub) -> None:
    got = download("L12R-8x")
    sae = SAE.from_pretrained(got.folder)
    assert sae.source.path == str(got.folder) and sae.source.repo_id is None
    _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x"])


def test_gated_without_token_hints_hf_token(fake_hub) -> None:
    with pytest.raises(DownloadError, match="gated") as exc:
        SAE.from_pretrained("L5TC-8x")
    assert "HF_TOKEN" in (exc.value.hint or "")


def test_hf_token_env_is_sent_as_authorization(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", fake_hub.hub.token)
    sae = SAE.from_pretrained("L5TC-8x")
    assert sae.is_transcoder
    assert all(r.headers.get("authorization") == f"Bearer {fake_hub.hub.token}" for r in fake_hub.hub.log)
    _assert_encode(sae, fake_hub.hp["L5TC-8x"], fake_hub.raw["L5TC-8x"])


def test_token_argument(fake_hub) -> None:
    SAE.from_pretrained("L5TC-8x", token=fake_hub.hub.token)
    assert fake_hub.hub.requests(CKPT, "GET")[0].headers["authorization"].endswith(fake_hub.hub.token)


def test_hf_hub_cache_env_respected(fake_hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(other))  # set after huggingface_hub was imported
    sae = SAE.from_pretrained("L12R-8x")
    assert Path(sae.source.path).is_relative_to(other)
    assert (other / "models--OpenMOSS-Team--Llama3_1-8B-Base-LXR-8x").is_dir()


def test_cache_dir_argument(fake_hub, tmp_path: Path) -> None:
    sae = SAE.from_pretrained("L12R-8x", cache_dir=str(tmp_path / "mine"))
    assert Path(sae.source.path).is_relative_to(tmp_path / "mine")


def test_lm_config_missing_is_tolerated(fake_hub) -> None:
    hub = fake_hub.hub
    repo = hub.repos["OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x"]
    tree = repo.commits[repo.refs["main"]]
    del tree["Llama3_1-8B-Base-L12R-8x/lm_config.json"]
    sae = SAE.from_pretrained("L12R-8x")
    assert "lm_config.json" not in sae.source.sha256


# ------------------------------------------------------------------ interrupted downloads
def test_connection_cut_once_is_resumed(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # so the cut lands between chunks
    hub = fake_hub.hub
    hub.cut_after[CKPT] = 10_000
    sae = SAE.from_pretrained("L12R-8x")
    gets = hub.requests(CKPT, "GET")
    assert len(gets) == 2
    start = int(gets[1].headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 10_000 and gets[1].status == 206
    _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x"])


def test_connection_cut_for_good_is_a_download_error_and_leaves_nothing(fake_hub) -> None:
    hub = fake_hub.hub
    hub.cut_after[CKPT] = 10_000
    hub.cut_always = True
    with pytest.raises(DownloadError, match="final.safetensors"):
        SAE.from_pretrained("L12R-8x")
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not list(cache.rglob("*.incomplete"))
    assert not list(cache.rglob("final.safetensors"))
    # the bytes received are kept under a name that is never read as a checkpoint, to resume
    partial = list(cache.rglob("*.llamascope-partial"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < 66_488
    hub.cut_after.clear()
    hub.cut_always = False
    sae = SAE.from_pretrained("L12R-8x")  # a later load resumes from the partial file
    _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x"])


def test_stale_incomplete_file_is_never_used(fake_hub) -> None:
    """A partial download left by a killed process must not become the blob."""
    blob, blobs = main_checkpoint(fake_hub.hub)
    (blobs / f"{blob.sha256}.incomplete").write_bytes(blob.data[:5000])
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.source.sha256[CKPT] == blob.sha256
    assert (blobs / blob.sha256).stat().st_size == blob.size


def test_truncated_blob_in_cache_is_detected(fake_hub) -> None:
    """A blob that exists but is short (e.g. copied from a broken cache) fails verification."""
    blob, blobs = main_checkpoint(fake_hub.hub)
    (blobs / blob.sha256).write_bytes(blob.data[:5000])
    with pytest.raises(CorruptCheckpointError, match="sha256"):
        SAE.from_pretrained("L12R-8x")
    assert not (blobs / blob.sha256).exists()
    sae = SAE.from_pretrained("L12R-8x")  # the corrupt blob was deleted: downloaded again
    assert sae.source.sha256[CKPT] == blob.sha256


def test_corrupt_bytes_from_server_are_detected_and_deleted(fake_hub) -> None:
    hub = fake_hub.hub
    hub.corrupt.add(CKPT)
    with pytest.raises(CorruptCheckpointError, match="does not match") as exc:
        SAE.from_pretrained("L12R-8x")
    assert "load again" in (exc.value.hint or "")
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert not list(cache.rglob("final.safetensors")) and not list(cache.rglob("*.llamascope-partial"))
    hub.corrupt.clear()
    sae = SAE.from_pretrained("L12R-8x")  # a plain re-run recovers (no force_download needed)
    _assert_encode(sae, fake_hub.hp["L12R-8x"], fake_hub.raw["L12R-8x"])


def test_force_download_downloads_again(fake_hub) -> None:
    SAE.from_pretrained("L12R-8x")
    SAE.from_pretrained("L12R-8x", force_download=True)
    assert len(fake_hub.hub.requests(CKPT, "GET")) == 2


# ------------------------------------------------------------------ full size
@pytest.mark.slow
def test_full_8x_size_bf16_checkpoint(fake_hub, tmp_path: Path) -> None:
    """One real-size (d_model 4096, d_sae 32768, bf16, ~537 MB) load through the fake Hub."""
    import time

    from safetensors.torch import save_file

    from .fakehub import release_files
    from .helpers import release_hyperparams

    d, f = 4096, 32768
    hp = release_hyperparams(layer=8, position="R", d_model=d, d_sae=f, threshold=0.2021484375,
                             norm_in=6.3125)
    g = torch.Generator().manual_seed(0)
    raw = {"encoder.weight": (torch.randn(f, d, generator=g) / 64).to(torch.bfloat16),
           "encoder.bias": torch.zeros(f, dtype=torch.bfloat16),
           "decoder.weight": (torch.randn(d, f, generator=g) / 64).to(torch.bfloat16),
           "decoder.bias": torch.zeros(d, dtype=torch.bfloat16)}
    path = tmp_path / "final.safetensors"
    save_file(raw, str(path))
    assert 0 < path.stat().st_size - (2 * f * d + f + d) * 2 < 1024  # ~537 MB + header
    files: dict = dict(release_files("Llama3_1-8B-Base-L8R-8x", hp, {k: v[:1] for k, v in raw.items()}))
    files["Llama3_1-8B-Base-L8R-8x/checkpoints/final.safetensors"] = path
    fake_hub.hub.commit("OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x", files)
    t0 = time.perf_counter()
    sae = SAE.from_pretrained("L8R-8x")
    first = time.perf_counter() - t0
    assert (sae.d_model, sae.d_sae) == (d, f)
    x = torch.randn(4, d) * 6.3125 / 64
    ref = reference_encode(hp, {k: v[:64] if k.startswith("encoder") else v[:, :64] if k == "decoder.weight"
                                else v for k, v in raw.items()}, x)
    torch.testing.assert_close(sae.encode(x)[:, :64].double(), ref, rtol=1e-4, atol=1e-4)
    fake_hub.hub.clear_log()
    again = SAE.from_pretrained("L8R-8x")  # warm cache: no weight request, no re-hash
    assert fake_hub.hub.requests(CKPT) == []
    assert again.source.sha256[CKPT] == sae.source.sha256[CKPT]
    print(f"first load through the fake Hub: {first:.1f} s")


def test_fetch_hyperparams_reads_only_hyperparams(fake_hub) -> None:
    from llamascope_sdk.loading.hub import fetch_hyperparams

    hp, source = fetch_hyperparams("L12R-8x", revision="v0")
    assert hp.d_sae == 256 and source.commit == fake_hub.commits["R-old"]
    assert {r.filename for r in fake_hub.hub.log} == {"hyperparams.json"}


def test_hf_endpoint_set_after_import_is_honoured(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub froze HF_ENDPOINT at import; download() reads it at call time."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "https://huggingface.co/{repo_id}/resolve/{revision}/{filename}")
    sae = SAE.from_pretrained("L12R-8x")  # HF_ENDPOINT (env) points at the fake Hub
    assert sae.source.commit == fake_hub.commits["R-new"] and fake_hub.hub.log


# ------------------------------------------------------------------ load_model errors, by class
def test_load_model_gated_is_a_hub_access_error(fake_hub) -> None:
    from llamascope_sdk.base.errors import HubAccessError
    from llamascope_sdk.loading.models import load_model

    with pytest.raises(HubAccessError, match="could not load model .*: it is gated on the Hub") as exc:
        load_model("OpenMOSS-Team/Llama3_1-8B-Base-LXTC-8x")
    assert isinstance(exc.value, DownloadError) and isinstance(exc.value, PermissionError)
    assert "HF_TOKEN" in (exc.value.hint or "")


def test_load_model_unknown_repo_and_revision_are_model_not_found(fake_hub) -> None:
    from llamascope_sdk.base.errors import ModelNotFoundError
    from llamascope_sdk.loading.models import load_model

    with pytest.raises(ModelNotFoundError, match="could not load model 'nobody/nothing': it is neither "
                                                 "a local folder nor a repository") as exc:
        load_model("nobody/nothing")
    assert isinstance(exc.value, DownloadError) and isinstance(exc.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="revision 'no-such-branch' not found on http"):
        load_model("OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x", revision="no-such-branch")


def test_load_model_offline_cold_cache(fake_hub, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamascope_sdk.loading.models import load_model

    set_offline(monkeypatch)
    with pytest.raises(DownloadError, match="could not load model 'someone/model': it is not in the local cache and downloads are disabled") as exc:
        load_model("someone/model")
    assert "HF_HUB_OFFLINE" in (exc.value.hint or "")
    assert fake_hub.hub.log == []


def test_load_model_error_classes_not_message_text() -> None:
    """The class decides, not the words: a message saying 'gated' or '401' is not taken for one."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    from llamascope_sdk.base.errors import HubAccessError
    from llamascope_sdk.loading.models import _load_error

    try:
        raise OSError("the 401 gated offline thing") from ValueError("x")
    except OSError as exc:
        err = _load_error("m", None, exc)
    assert type(err) is DownloadError and not isinstance(err, HubAccessError)
    try:
        raise OSError("nothing telling") from OfflineModeIsEnabled("off")
    except OSError as exc:
        err = _load_error("m", None, exc)
    assert "downloads are disabled" in str(err)
