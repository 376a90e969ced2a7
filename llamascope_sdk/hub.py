"""Downloading one Llama Scope checkpoint from the Hugging Face Hub, pinned and verified.

``download(name)`` resolves any accepted spelling (:func:`registry.resolve`), fetches only
that SAE's three files with ``huggingface_hub.hf_hub_download`` and returns the local folder
together with its provenance (:class:`sae.Source`).

Decisions:

* **Pinning.** ``hyperparams.json`` is fetched first at the requested revision (default
  ``"main"``); the commit it resolved to is read from the snapshot path
  (``.../snapshots/<sha>/...``) and the other two files are fetched *at that commit*. The
  three files therefore always come from one commit, and a cached file at a commit sha is
  returned by ``hf_hub_download`` without any request: a second load asks the Hub only
  where ``main`` points (one HEAD for hyperparams.json) and never for the weights.
* **Fallbacks.** Organisations are tried in :data:`registry.ORGS` order (``OpenMOSS-Team``,
  then ``fnlp`` when the repository is not found); a name that spells its organisation
  tries that one first. Folder spellings are tried in :data:`registry.FOLDER_TEMPLATES`
  order (the current ``Llama3_1-8B-Base-L12M-32x``, then ``Llama3_1Base-L12M-32x`` of
  revisions before the "Rename folders" commit) when the folder is not found. An explicit
  ``repo_id:subfolder`` is used as given, with no fallback.
* **Verification.** For an LFS file the blob's name in the HF cache is the sha256 that the
  server announced. After a fresh download the content is hashed once and compared with it
  (mismatch: the blob is deleted and :class:`CorruptCheckpointError` raised); a small
  record under ``paths.verified_dir()`` remembers the check, so later loads do not
  re-hash 0.5-2 GB. The JSON files are small and hashed directly.
* **Environment.** huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once
  at import; this module reads them again at call time, so setting them after import works.
  HF_TOKEN is read by huggingface_hub at call time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import CorruptCheckpointError, DownloadError, SaeNotFoundError
from .hyperparams import Hyperparams
from .paths import verified_dir
from .registry import FOLDER_TEMPLATES, ORGS, SaeRef, resolve
from .release import CHECKPOINT, HYPERPARAMS, LM_CONFIG

DEFAULT_REVISION = "main"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TRUE = {"1", "on", "yes", "true"}
#: Attempts to continue a cut checkpoint download within one call (each resumes by Range).
_RESUME_ATTEMPTS = 5


@dataclass
class Source:
    """Where an SAE's weights came from, for provenance and reproducibility."""

    path: str | None = None
    repo_id: str | None = None
    subfolder: str | None = None
    revision: str | None = None  # as asked for
    commit: str | None = None  # as resolved
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256


@dataclass(frozen=True)
class Downloaded:
    """A release folder in the local HF cache, and where it came from."""

    folder: Path
    ref: SaeRef | None
    source: Source


@dataclass(frozen=True)
class _Settings:
    cache_dir: str
    endpoint: str | None
    token: str | bool | None
    offline: bool
    force_download: bool


def download(name: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
             token: str | bool | None = None, force_download: bool = False,
             local_files_only: bool = False) -> Downloaded:
    """Fetch one checkpoint's files (hyperparams.json, lm_config.json, checkpoints/final.safetensors).

    Args:
        name: any spelling :func:`registry.resolve` accepts, e.g. ``"L12M-128k"``,
            ``"fnlp/Llama3_1-8B-Base-L12M-32x"`` or ``"<repo_id>:<subfolder>"``.
        revision: branch, tag or commit sha (default ``"main"``). The folder spelling must
            match the revision; the fallback handles that for you.
        cache_dir: HF cache folder (default $HF_HUB_CACHE or ~/.cache/huggingface/hub).
        token: HF token; default $HF_TOKEN or the stored login.
        force_download: download again even if cached (the content is verified again).
        local_files_only: use the cache only; also implied by HF_HUB_OFFLINE=1.

    Returns:
        :class:`Downloaded` with the snapshot folder, the registry entry and a
        :class:`Source` holding repo_id, subfolder, revision, resolved commit and sha256s.

    Raises:
        UnknownSaeError: the name denotes no checkpoint (lists the closest names).
        SaeNotFoundError: no repository, folder, file or revision of that name.
        DownloadError: gated repository without a token, offline with a cold cache,
            network failure.
        CorruptCheckpointError: the downloaded checkpoint does not match its sha256.

    Example:
        >>> got = download("L12R-8x", revision="main")
        >>> got.source.commit
    """
    ref = resolve(name)
    settings = _settings(cache_dir, token, force_download, local_files_only)
    rev = revision or DEFAULT_REVISION
    hp_path, repo_id, folder = _fetch_hyperparams(name, ref, rev, settings)
    commit = _commit_from_path(hp_path)
    pinned = commit or rev
    lm_path = _fetch_optional(repo_id, folder, LM_CONFIG, pinned, settings)
    if commit is not None and not settings.offline:
        _resumable_blob(repo_id, f"{folder}/{CHECKPOINT}", commit, settings)
    ckpt_path = _fetch(repo_id, folder, CHECKPOINT, pinned, settings)
    sha = {HYPERPARAMS: _sha256_file(hp_path)}
    if lm_path is not None:
        sha[LM_CONFIG] = _sha256_file(lm_path)
    sha[CHECKPOINT] = verify_checkpoint(ckpt_path)
    source = Source(path=str(Path(hp_path).parent), repo_id=repo_id, subfolder=folder,
                    revision=rev, commit=commit, sha256=sha)
    return Downloaded(folder=Path(hp_path).parent, ref=ref, source=source)


def fetch_hyperparams(name: str, *, revision: str | None = None,
                      cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                      local_files_only: bool = False) -> tuple[Hyperparams, Source]:
    """Fetch only hyperparams.json (a few hundred bytes, not the weights) with the same
    name resolution, fallbacks and pinning as :func:`download`.

    Returns:
        (the parsed :class:`Hyperparams`, a :class:`Source` with repo, folder and commit).

    Raises:
        The same errors as :func:`download`, and HyperparamsError for an invalid file.
    """
    ref = resolve(name)
    settings = _settings(cache_dir, token, False, local_files_only)
    rev = revision or DEFAULT_REVISION
    hp_path, repo_id, folder = _fetch_hyperparams(name, ref, rev, settings)
    source = Source(path=str(Path(hp_path).parent), repo_id=repo_id, subfolder=folder, revision=rev,
                    commit=_commit_from_path(hp_path), sha256={HYPERPARAMS: _sha256_file(hp_path)})
    return Hyperparams.from_file(hp_path), source


# --------------------------------------------------------------------------- settings
def _env_true(key: str) -> bool:
    return os.environ.get(key, "").strip().lower() in _TRUE


def _settings(cache_dir: str | os.PathLike[str] | None, token: str | bool | None,
              force_download: bool, local_files_only: bool) -> _Settings:
    from huggingface_hub import constants

    if cache_dir is None:
        env = os.environ.get("HF_HUB_CACHE")
        if env is None and os.environ.get("HF_HOME"):
            env = os.path.join(os.environ["HF_HOME"], "hub")
        cache_dir = env or constants.HF_HUB_CACHE
    offline = (local_files_only or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
               or bool(constants.HF_HUB_OFFLINE))
    endpoint = os.environ.get("HF_ENDPOINT") or None
    return _Settings(cache_dir=str(Path(cache_dir).expanduser()),
                     endpoint=endpoint.rstrip("/") if endpoint else None, token=token,
                     offline=offline, force_download=force_download)


# --------------------------------------------------------------------------- candidates
def _candidates(name: str, ref: SaeRef) -> tuple[list[str], list[str]]:
    """(repo ids, folders) to try, in order."""
    text = name.strip()
    if ":" in text:  # explicit repo_id:subfolder: used exactly as given
        repo, _, folder = text.partition(":")
        return [repo.strip()], [folder.strip().strip("/")]
    orgs = list(ORGS)
    if "/" in text and not text.lower().startswith("llama3.1-8b/"):
        asked = text.split("/", 1)[0].lower()
        orgs.sort(key=lambda o: o.lower() != asked)  # the spelled org first, stable otherwise
    return [ref.repo_id(o) for o in orgs], [ref.subfolder(t) for t in FOLDER_TEMPLATES]


def _fetch_hyperparams(name: str, ref: SaeRef, revision: str,
                       s: _Settings) -> tuple[str, str, str]:
    """Find the first (repo, folder) that has hyperparams.json at ``revision``."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repos, folders = _candidates(name, ref)
    missing_repos: list[str] = []
    missing_folders: list[str] = []
    not_cached: list[str] = []
    for repo_id in repos:
        for folder in folders:
            try:
                return _hf_download(repo_id, folder, HYPERPARAMS, revision, s), repo_id, folder
            except GatedRepoError:
                raise DownloadError(
                    f"{repo_id} is gated: access to {folder}/{HYPERPARAMS} was refused (401)",
                    hint="accept the licence on huggingface.co, then set HF_TOKEN (or pass "
                         "token=..., or run `hf auth login`)") from None
            except RevisionNotFoundError:
                raise SaeNotFoundError(
                    f"revision {revision!r} not found in {repo_id}: use a branch, tag or a "
                    "40-character commit sha of that repository (default 'main')") from None
            except RepositoryNotFoundError:
                missing_repos.append(repo_id)
                break  # next organisation
            except RemoteEntryNotFoundError:
                missing_folders.append(f"{repo_id}:{folder}")
            except LocalEntryNotFoundError as exc:
                not_cached.append(f"{repo_id}:{folder}")
                if not s.offline and _is_connection_problem(exc):
                    raise _unreachable(repo_id, folder, exc) from None
    if not_cached and s.offline:
        raise DownloadError(
            f"{ref.name} is not in the local cache ({s.cache_dir}) and downloads are disabled "
            f"(HF_HUB_OFFLINE=1 or local_files_only=True); looked for {', '.join(not_cached)} "
            f"at revision {revision!r}",
            hint="unset HF_HUB_OFFLINE and load once online, or point HF_HUB_CACHE at a warm cache")
    if missing_folders:
        raise SaeNotFoundError(
            f"{ref.name}: no {HYPERPARAMS} at revision {revision!r}; tried "
            f"{', '.join(missing_folders)}. The repository exists but has no such folder "
            "at that revision (folder spellings: "
            f"{', '.join(t.format(layer='L', pos='P', exp='X') for t in FOLDER_TEMPLATES)})")
    raise SaeNotFoundError(
        f"{ref.name}: repository not found on the Hub; tried {', '.join(missing_repos or repos)}",
        hint="check HF_ENDPOINT and the name; the release lives at "
             f"{ref.repo_id(ORGS[0])} (formerly {ref.repo_id(ORGS[-1])})")


def _fetch(repo_id: str, folder: str, filename: str, revision: str, s: _Settings) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
    )

    try:
        return _hf_download(repo_id, folder, filename, revision, s)
    except RemoteEntryNotFoundError:
        raise SaeNotFoundError(
            f"{repo_id}:{folder} has {HYPERPARAMS} but no {filename} at commit {revision}; "
            f"a release folder holds {HYPERPARAMS}, {LM_CONFIG} and {CHECKPOINT}") from None
    except GatedRepoError:
        raise DownloadError(f"{repo_id} is gated: access to {folder}/{filename} was refused",
                            hint="set HF_TOKEN or pass token=...") from None
    except LocalEntryNotFoundError as exc:
        if s.offline:
            raise DownloadError(
                f"{repo_id}:{folder}/{filename} at commit {revision} is not in the local cache "
                f"({s.cache_dir}) and downloads are disabled (HF_HUB_OFFLINE=1 or "
                "local_files_only=True)",
                hint="unset HF_HUB_OFFLINE and load once online") from None
        raise _unreachable(repo_id, folder, exc) from None


def _fetch_optional(repo_id: str, folder: str, filename: str, revision: str,
                    s: _Settings) -> str | None:
    """lm_config.json is informative only (spec 2.2): a missing one is tolerated."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return _hf_download(repo_id, folder, filename, revision, s)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None


def _hf_download(repo_id: str, folder: str, filename: str, revision: str, s: _Settings) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return hf_hub_download(repo_id, filename, subfolder=folder or None, revision=revision,
                               cache_dir=s.cache_dir, token=s.token, endpoint=s.endpoint,
                               force_download=s.force_download and not s.offline,
                               local_files_only=s.offline)
    except (LocalEntryNotFoundError, RemoteEntryNotFoundError, RepositoryNotFoundError,
            RevisionNotFoundError):
        raise  # the callers turn these into SaeNotFoundError / DownloadError with context
    except Exception as exc:
        # A connection cut that huggingface_hub's resume retries could not recover, a size
        # mismatch, a 5xx: nothing partial is kept (hf_hub_download deletes its temp file).
        import httpx2

        if not isinstance(exc, (httpx2.HTTPError, OSError)):
            raise
        raise DownloadError(
            f"download of {repo_id}:{folder}/{filename} failed: {type(exc).__name__}: {exc}",
            hint="check the connection and load again; nothing partial is kept") from None


def _resumable_blob(repo_id: str, path_in_repo: str, commit: str, s: _Settings) -> None:
    """Put an LFS file's blob into the HF cache, resuming what an interrupted process left.

    huggingface_hub (since PR #4228) downloads into a per-process temporary file, so a run
    killed halfway through a 2 GB checkpoint starts from zero next time. Here the bytes go to
    ``blobs/<sha256>.llamascope-partial``, which a later run continues with an HTTP Range
    request; the finished file is renamed to ``blobs/<sha256>``, where ``hf_hub_download``
    finds it and only adds the snapshot link. The content is verified by ``verify_checkpoint``.
    Files that are not LFS, or already cached, are left to ``hf_hub_download``.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name

    blobs = Path(s.cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model") / "blobs"
    snapshot = blobs.parent / "snapshots" / commit / path_in_repo
    if snapshot.exists() and not s.force_download:
        return
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo_id, path_in_repo, revision=commit,
                                               endpoint=s.endpoint), token=s.token)
    except Exception:  # noqa: BLE001 - hf_hub_download reports the problem with context
        return
    etag, size = meta.etag, meta.size
    if not etag or not _SHA256.match(etag) or size is None or (blobs / etag).exists():
        return
    part = blobs / f"{etag}.llamascope-partial"
    blobs.mkdir(parents=True, exist_ok=True)
    if part.exists() and part.stat().st_size > size:  # not ours to continue: start again
        part.unlink()
    def complete() -> bool:
        return part.exists() and part.stat().st_size == size

    error: Exception | None = None
    for _attempt in range(_RESUME_ATTEMPTS):
        if complete():
            break
        try:
            _continue_download(meta.location, part, size, s.token, tqdm_desc=path_in_repo)
        except Exception as exc:  # noqa: BLE001 - retried, then reported below
            error = exc
    if not complete():
        got = part.stat().st_size if part.exists() else 0
        raise DownloadError(
            f"download of {repo_id}:{path_in_repo} failed after {got} of {size} bytes "
            f"({_RESUME_ATTEMPTS} attempts): {error}",
            hint="run the same command again: it resumes from the partial file")
    os.replace(part, blobs / etag)


def _continue_download(url: str, part: Path, size: int, token: str | bool | None,
                       tqdm_desc: str) -> None:
    """Append the missing bytes of ``part`` (Range request), as they arrive."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = build_hf_headers(token=token)
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with get_session().stream("GET", url, headers=headers, follow_redirects=True) as r:
        hf_raise_for_status(r)
        if offset and r.status_code != 206:  # the server ignored the range
            offset = 0
        with open(part, "ab" if offset else "wb") as fh, tqdm(
                total=size, initial=offset, unit="B", unit_scale=True,
                desc=tqdm_desc.rsplit("/", 1)[-1]) as bar:
            for chunk in r.iter_bytes():  # as received: a cut keeps every byte so far
                fh.write(chunk)
                bar.update(len(chunk))


def _is_connection_problem(exc: BaseException) -> bool:
    return exc.__cause__ is not None or "connection" in str(exc).lower()


def _unreachable(repo_id: str, folder: str, exc: BaseException) -> DownloadError:
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    cause = exc.__cause__ or exc
    return DownloadError(
        f"could not reach the Hub at {endpoint} for {repo_id}:{folder} and it is not cached: "
        f"{type(cause).__name__}: {cause}",
        hint="check the connection / HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache only")


# --------------------------------------------------------------------------- provenance
def _commit_from_path(path: str) -> str | None:
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _record_path(key: str) -> Path:
    
    return verified_dir() / f"{key}.json"


def verify_checkpoint(path: str | Path) -> str:
    """sha256 of a cached checkpoint, hashing it only the first time it is seen.

    The blob name of an LFS file in the HF cache is the sha256 the server announced. A
    verified blob is remembered by (sha256, blob path, size, mtime); a new or replaced blob
    is hashed once. A mismatch deletes the blob and its snapshot link.

    Raises:
        CorruptCheckpointError: the content does not hash to the announced sha256.
    """
    link = Path(path)
    blob = Path(os.path.realpath(link))
    st = blob.stat()
    announced = blob.name if _SHA256.match(blob.name) else None
    key = announced or hashlib.sha256(str(blob).encode()).hexdigest()
    stamp = {"blob": str(blob), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    record = _record_path(key)
    try:
        known: dict[str, Any] = json.loads(record.read_text())
        if {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str):
            return str(known["sha256"])
    except (OSError, ValueError):
        pass
    actual = _sha256_file(blob)
    if announced is not None and actual != announced:
        for p in {blob, link}:
            p.unlink(missing_ok=True)
        raise CorruptCheckpointError(
            f"{link.name} from {link.parent}: content sha256 {actual[:12]}... does not match the "
            f"sha256 {announced[:12]}... announced by the Hub; the corrupt file was deleted",
            hint="load again (force_download=True); if it repeats, the mirror serves bad data")
    with contextlib.suppress(OSError):  # a read-only SDK cache only costs a re-hash next time
        atomic_write_text(record, json.dumps({**stamp, "sha256": actual}) + "\n")
    return actual
