"""Every downloaded file is checked against what the Hub announced for it: the sha256 (LFS
checkpoint) or the git blob sha1 (hyperparams.json, lm_config.json). A mismatch, or an ETag
that is no hash, is refused and the bad file removed so that a plain re-run recovers.
Expected hashes are computed here with hashlib, independently of the SDK."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from llamascope_sdk import SAE
from llamascope_sdk.base.errors import (
    ChecksumMismatchError,
    CorruptCheckpointError,
    UnverifiableDownloadError,
)
from llamascope_sdk.loading.hub import download, fetch_hyperparams

from .fakehub import fake_hub_fixture  # noqa: F401  (fixture)
from .helpers import raw_tensors

REPO = "OpenMOSS-Team/Llama3_1-8B-Base-LXR-8x"
FOLDER = "Llama3_1-8B-Base-L12R-8x"
CKPT = "checkpoints/final.safetensors"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def served(fake_hub, path: str) -> bytes:
    repo = fake_hub.hub.repos[REPO]
    return repo.commits[repo.refs["main"]][f"{FOLDER}/{path}"].data


def cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])


def cached_copies(name: str) -> list[Path]:
    """Snapshot entries of that file name (links, dangling or not) in the HF cache."""
    return [p for p in cache().rglob(name) if "snapshots" in p.parts]


def tampered_hyperparams(fake_hub) -> tuple[bytes, float]:
    hp = dict(fake_hub.hp["L12R-8x"])
    hp["jump_relu_threshold"] = hp["jump_relu_threshold"] * 3
    return json.dumps(hp, indent=4).encode(), hp["jump_relu_threshold"]


def test_normal_load_is_verified_and_hashes_match_hashlib(fake_hub) -> None:
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.source.verified is True
    for name in ("hyperparams.json", "lm_config.json", CKPT):
        data = served(fake_hub, name)
        assert sae.source.sha256[name] == hashlib.sha256(data).hexdigest()
    # the blobs are named by what the Hub announced: git blob sha1 / sha256
    blobs = {p.name for p in (cache() / f"models--{REPO.replace('/', '--')}" / "blobs").iterdir()}
    assert git_sha1(served(fake_hub, "hyperparams.json")) in blobs
    assert git_sha1(served(fake_hub, "lm_config.json")) in blobs
    assert hashlib.sha256(served(fake_hub, CKPT)).hexdigest() in blobs


def test_tampered_hyperparams_are_refused_removed_and_a_rerun_recovers(fake_hub) -> None:
    original = served(fake_hub, "hyperparams.json")
    bad, bad_threshold = tampered_hyperparams(fake_hub)
    fake_hub.hub.tamper[f"{FOLDER}/hyperparams.json"] = bad
    with pytest.raises(ChecksumMismatchError) as exc:
        SAE.from_pretrained("L12R-8x")
    msg = str(exc.value)
    assert isinstance(exc.value, CorruptCheckpointError)
    assert "hyperparams.json" in msg and "git blob sha1" in msg and "does not match" in msg
    assert git_sha1(bad)[:12] in msg and git_sha1(original)[:12] in msg
    assert "load again" in (exc.value.hint or "")
    assert cached_copies("hyperparams.json") == []  # snapshot link gone
    assert not list(cache().rglob(git_sha1(original)))  # and the blob
    assert fake_hub.hub.requests(CKPT) == []  # refused before the weights were asked for
    fake_hub.hub.tamper.clear()
    sae = SAE.from_pretrained("L12R-8x")  # no force_download
    assert sae.hyperparams.jump_relu_threshold == fake_hub.hp["L12R-8x"]["jump_relu_threshold"] != bad_threshold
    assert sae.source.sha256["hyperparams.json"] == hashlib.sha256(original).hexdigest()


def test_tampered_lm_config_is_refused(fake_hub) -> None:
    original = served(fake_hub, "lm_config.json")
    bad = original.replace(b"Llama-3.1-8B", b"Llama-3.1-70")
    assert len(bad) == len(original) and bad != original
    fake_hub.hub.tamper[f"{FOLDER}/lm_config.json"] = bad
    with pytest.raises(ChecksumMismatchError, match=r"lm_config\.json.*git blob sha1 "
                                                    + git_sha1(bad)[:12]):
        SAE.from_pretrained("L12R-8x")
    assert cached_copies("lm_config.json") == []
    fake_hub.hub.tamper.clear()
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.source.sha256["lm_config.json"] == hashlib.sha256(original).hexdigest()


def test_tampered_weights_under_the_original_sha256_are_refused(fake_hub) -> None:
    from safetensors.torch import save as save_safetensors

    from .fakehub import D_MODEL, D_SAE

    original = served(fake_hub, CKPT)
    bad = save_safetensors(raw_tensors(D_MODEL, D_SAE, seed=99))
    assert len(bad) == len(original) and bad != original
    fake_hub.hub.tamper[f"{FOLDER}/{CKPT}"] = bad
    with pytest.raises(ChecksumMismatchError) as exc:
        SAE.from_pretrained("L12R-8x")
    msg = str(exc.value)
    assert hashlib.sha256(bad).hexdigest()[:12] in msg and hashlib.sha256(original).hexdigest()[:12] in msg
    assert cached_copies("final.safetensors") == [] and not list(cache().rglob("*.llamascope-partial"))
    fake_hub.hub.tamper.clear()
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.source.sha256[CKPT] == hashlib.sha256(original).hexdigest()


@pytest.mark.parametrize("etag, shown", [('W/"abc"', "'abc'"), ('"0123456789ab"', "'0123456789ab'")])
@pytest.mark.parametrize("path", ["hyperparams.json", "lm_config.json", CKPT])
def test_an_etag_that_is_no_hash_is_refused(fake_hub, path: str, etag: str, shown: str) -> None:
    fake_hub.hub.etag_override[f"{FOLDER}/{path}"] = etag
    with pytest.raises(UnverifiableDownloadError) as exc:
        SAE.from_pretrained("L12R-8x")
    assert isinstance(exc.value, CorruptCheckpointError)
    msg = str(exc.value)
    assert Path(path).name in msg and f"ETag {shown}" in msg and "cannot be checked" in msg
    assert "LLAMASCOPE_VERIFY=0" in (exc.value.hint or "") and "verify=False" in (exc.value.hint or "")
    assert cached_copies(Path(path).name) == []
    assert not list(cache().rglob(shown.strip("'")))  # the blob named by that ETag is gone too
    fake_hub.hub.etag_override.clear()  # the mirror is fixed: a plain re-run recovers
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.source.verified and sae.source.sha256[path] == hashlib.sha256(served(fake_hub, path)).hexdigest()


def test_non_hash_etag_on_tampered_weights_no_longer_loads_them(fake_hub) -> None:
    """Before: an LFS ETag that is not a sha256 skipped the check and tampered weights loaded."""
    from safetensors.torch import save as save_safetensors

    from .fakehub import D_MODEL, D_SAE

    fake_hub.hub.tamper[f"{FOLDER}/{CKPT}"] = save_safetensors(raw_tensors(D_MODEL, D_SAE, seed=99))
    fake_hub.hub.etag_override[f"{FOLDER}/{CKPT}"] = '"0123456789ab"'
    with pytest.raises(UnverifiableDownloadError, match="final.safetensors"):
        SAE.from_pretrained("L12R-8x")


def test_verify_false_and_env_opt_out_trust_a_rewritten_etag(fake_hub, monkeypatch) -> None:
    fake_hub.hub.etag_override[f"{FOLDER}/{CKPT}"] = 'W/"abc"'
    fake_hub.hub.etag_override[f"{FOLDER}/hyperparams.json"] = '"0123456789ab"'
    sae = SAE.from_pretrained("L12R-8x", verify=False)
    assert sae.source.verified is False
    assert sae.source.sha256[CKPT] == hashlib.sha256(served(fake_hub, CKPT)).hexdigest()
    monkeypatch.setenv("LLAMASCOPE_VERIFY", "0")
    got = download("L12R-8x", force_download=True)
    assert got.source.verified is False
    hp, source = fetch_hyperparams("L12R-8x")
    assert source.verified is False and hp.d_sae == 256
    # verification back on: what could not be checked is refused, not trusted from the record
    monkeypatch.delenv("LLAMASCOPE_VERIFY")
    with pytest.raises(UnverifiableDownloadError):
        SAE.from_pretrained("L12R-8x")


def test_opt_out_does_not_vouch_for_the_cache_later(fake_hub) -> None:
    """Tampered weights accepted with verify=False are refused by the next verifying load."""
    from safetensors.torch import save as save_safetensors

    from .fakehub import D_MODEL, D_SAE

    bad = save_safetensors(raw_tensors(D_MODEL, D_SAE, seed=99))
    fake_hub.hub.tamper[f"{FOLDER}/{CKPT}"] = bad
    sae = SAE.from_pretrained("L12R-8x", verify=False)  # the documented opt-out trusts it
    assert sae.source.sha256[CKPT] == hashlib.sha256(bad).hexdigest()
    fake_hub.hub.tamper.clear()
    with pytest.raises(ChecksumMismatchError):
        SAE.from_pretrained("L12R-8x")  # cached blob checked against its announced sha256
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.source.sha256[CKPT] == hashlib.sha256(served(fake_hub, CKPT)).hexdigest()


def test_corrupt_cached_json_is_detected_and_a_plain_rerun_recovers(fake_hub) -> None:
    SAE.from_pretrained("L12R-8x")
    original = served(fake_hub, "hyperparams.json")
    blob = next(cache().rglob(git_sha1(original)))
    bad, _ = tampered_hyperparams(fake_hub)
    os.chmod(blob, 0o644)
    blob.write_bytes(bad)  # e.g. a broken disk or a hand edit
    st = blob.stat()
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ChecksumMismatchError, match="hyperparams.json") as exc:
        SAE.from_pretrained("L12R-8x")
    assert "load again" in (exc.value.hint or "") and "force_download" not in (exc.value.hint or "")
    assert not blob.exists() and cached_copies("hyperparams.json") == []
    sae = SAE.from_pretrained("L12R-8x")
    assert sae.hyperparams.jump_relu_threshold == fake_hub.hp["L12R-8x"]["jump_relu_threshold"]


def test_warm_load_reads_the_record_instead_of_hashing(fake_hub, monkeypatch) -> None:
    import llamascope_sdk.loading.verification as hub_mod

    SAE.from_pretrained("L12R-8x")
    fake_hub.hub.clear_log()
    hashed: list[str] = []
    real = hub_mod._digests
    monkeypatch.setattr(hub_mod, "_digests", lambda p, git: hashed.append(str(p)) or real(p, git))
    SAE.from_pretrained("L12R-8x")
    assert hashed == []  # neither the weights nor the JSON files were hashed for verification
    assert [(r.method, r.filename) for r in fake_hub.hub.log] == [("HEAD", "hyperparams.json")]
