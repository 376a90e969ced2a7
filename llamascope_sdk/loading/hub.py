"""Downloading one Llama Scope checkpoint from the Hugging Face Hub, pinned and verified.

``download(name)`` resolves any accepted spelling (:func:`registry.resolve`), fetches only
that SAE's three files with ``huggingface_hub.hf_hub_download`` and returns the local folder
together with its provenance (:class:`Provenance`).

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
* **Verification** (:mod:`llamascope_sdk.loading.verification`). Every file is checked against the hash
  the Hub announced for it (sha256 for the checkpoint, git blob sha1 for the JSON files); a
  mismatch or an ETag that is no hash is refused and the file removed, so a plain re-run
  recovers. Opt-out for mirrors that rewrite ETags: ``LLAMASCOPE_VERIFY=0`` or ``verify=False``.
* **Resume and concurrency** (:mod:`llamascope_sdk.loading.resumable`). The checkpoint blob is
  downloaded so that an interrupted download continues by Range request, under a file lock
  that lets one of several processes sharing a cache download it while the others wait.
* **Unreachable Hub.** A file that is not cached is first asked for with one HEAD request
  without retries (4 s connect timeout). If the Hub cannot be reached, the load fails at
  once with one :class:`HubUnreachableError` that says what is cached for this SAE, instead
  of huggingface_hub's ~25 s of logged retries. A server that answers keeps
  huggingface_hub's retries (5xx, 429) and the in-call Range resume of a cut connection.
* **Environment.** huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE once
  at import; this module reads them again at call time, so setting them after import works.
  HF_TOKEN is read by huggingface_hub at call time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import (
    DownloadError,
    HubAccessError,
    HubUnreachableError,
    SaeNotFoundError,
)
from llamascope_sdk.core.hyperparams import Hyperparams
from llamascope_sdk.loading.hub_errors import (
    Unreachable,
    cache_summary,
    translate,
    unreachable_error,
)
from llamascope_sdk.loading.registry import FOLDER_TEMPLATES, ORGS, SaeRef, resolve
from llamascope_sdk.loading.release import CHECKPOINT, HYPERPARAMS, LM_CONFIG
from llamascope_sdk.loading.resumable import one_line, resumable_blob
from llamascope_sdk.loading.verification import (
    SHA1,
    sha256_file,
    verify_checkpoint,
    verify_enabled,
    verify_file,
)

DEFAULT_REVISION = "main"
_COMMIT = SHA1  # a commit id is a 40-hex sha1
_TRUE = {"1", "on", "yes", "true"}
#: The first HEAD for a file that is not cached: seconds to connect, and for the answer.
_PROBE_CONNECT_TIMEOUT = 4.0
_PROBE_READ_TIMEOUT = 10.0


@dataclass
class Provenance:
    """Where an SAE's weights came from (``sae.source``), for reproducibility: the repository,
    folder, revision, resolved commit and the sha256 of every file."""

    path: str | None = None
    repo_id: str | None = None
    subfolder: str | None = None
    revision: str | None = None  # as asked for
    commit: str | None = None  # as resolved
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    verified: bool = False  # every file checked against the Hub's announced hash


@dataclass(frozen=True)
class Downloaded:
    """A release folder in the local HF cache, and where it came from."""

    folder: Path
    ref: SaeRef | None
    source: Provenance


@dataclass(frozen=True)
class Settings:
    cache_dir: str
    endpoint: str | None
    token: str | bool | None
    offline: bool
    force_download: bool
    verify: bool = True


def download(name: str, *, revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
             token: str | bool | None = None, force_download: bool = False,
             local_files_only: bool = False, verify: bool | None = None) -> Downloaded:
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
        verify: check every file against the hash the Hub announced (default True, or
            False when $LLAMASCOPE_VERIFY is 0/false/no/off). Turn it off only for a mirror
            that rewrites ETags: the content is then trusted unchecked.

    Returns:
        :class:`Downloaded` with the snapshot folder, the registry entry and a
        :class:`Provenance` holding repo_id, subfolder, revision, resolved commit and sha256s.

    Raises:
        UnknownSaeError: the name denotes no checkpoint (lists the closest names).
        SaeNotFoundError: no repository, folder, file or revision of that name.
        HubUnreachableError: the Hub cannot be reached and the files are not cached (at
            once, without retries; the message says what is cached for this SAE).
        HubAccessError: gated repository without a token that may read it.
        DownloadError: offline with a cold cache, a cut download, a failing server.
        ChecksumMismatchError: a file does not hash to what the Hub announced (removed).
        UnverifiableDownloadError: the Hub's ETag for a file is no hash (removed).

    Example:
        >>> got = download("L12R-8x", revision="main")
        >>> got.source.commit
    """
    ref = resolve(name)
    s = settings(cache_dir, token, force_download, local_files_only, verify)
    rev = revision or DEFAULT_REVISION
    try:
        hp_path, repo_id, folder = _fetch_hyperparams(name, ref, rev, s)
        commit = commit_from_path(hp_path)
        pinned = commit or rev
        lm_path = _fetch_optional(repo_id, folder, LM_CONFIG, pinned, s)
        ckpt_path, etag = _fetch(repo_id, folder, CHECKPOINT, pinned, s, resume=commit is not None)
    except Unreachable as exc:
        raise _unreachable_error(name, ref, rev, s, exc.cause) from None
    sha = {HYPERPARAMS: sha256_file(hp_path)}
    if lm_path is not None:
        sha[LM_CONFIG] = sha256_file(lm_path)
    sha[CHECKPOINT] = verify_checkpoint(ckpt_path, verify=s.verify, etag=etag)
    source = Provenance(path=str(Path(hp_path).parent), repo_id=repo_id, subfolder=folder,
                    revision=rev, commit=commit, sha256=sha, verified=s.verify)
    return Downloaded(folder=Path(hp_path).parent, ref=ref, source=source)


def fetch_hyperparams(name: str, *, revision: str | None = None,
                      cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                      local_files_only: bool = False,
                      verify: bool | None = None) -> tuple[Hyperparams, Provenance]:
    """Fetch only hyperparams.json (a few hundred bytes, not the weights) with the same
    name resolution, fallbacks, pinning and verification as :func:`download`.

    Returns:
        (the parsed :class:`Hyperparams`, a :class:`Provenance` with repo, folder and commit).

    Raises:
        The same errors as :func:`download`, and HyperparamsError for an invalid file.
    """
    ref = resolve(name)
    s = settings(cache_dir, token, False, local_files_only, verify)
    rev = revision or DEFAULT_REVISION
    try:
        hp_path, repo_id, folder = _fetch_hyperparams(name, ref, rev, s)
    except Unreachable as exc:
        raise _unreachable_error(name, ref, rev, s, exc.cause) from None
    source = Provenance(path=str(Path(hp_path).parent), repo_id=repo_id, subfolder=folder, revision=rev,
                    commit=commit_from_path(hp_path), sha256={HYPERPARAMS: sha256_file(hp_path)},
                    verified=s.verify)
    return Hyperparams.from_file(hp_path), source


def check_reachable(repo_id: str, filename: str, *, revision: str | None = None,
                    token: str | bool | None = None) -> None:
    """Fail at once when the Hub cannot be reached for a file that is not cached.

    One HEAD without retries (4 s connect timeout), and nothing at all when offline or when
    the file is cached at ``revision``: used before handing a Hub id to transformers, whose
    ``hf_hub_download`` calls would otherwise log ~25 s of retries first.

    Raises:
        HubUnreachableError: no connection to HF_ENDPOINT.
        huggingface_hub's RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError,
        RemoteEntryNotFoundError: as the Hub answered.
    """
    s = settings(None, token, False, False)
    rev = revision or DEFAULT_REVISION
    if s.offline or _is_cached(repo_id, filename, rev, s):
        return
    try:
        _probe(repo_id, filename, rev, s)
    except Unreachable as exc:
        raise HubUnreachableError(
            f"could not reach the Hub at {_endpoint(s)} for {repo_id} ({type(exc.cause).__name__}: "
            f"{one_line(exc.cause)}); {filename} at revision {rev!r} is not in {s.cache_dir}",
            hint="check the connection, set HF_ENDPOINT to a reachable mirror, or point "
                 "HF_HUB_CACHE at a warm cache") from None


# --------------------------------------------------------------------------- settings
def _env_true(key: str) -> bool:
    return os.environ.get(key, "").strip().lower() in _TRUE


def settings(cache_dir: str | os.PathLike[str] | None, token: str | bool | None,
              force_download: bool, local_files_only: bool, verify: bool | None = None) -> Settings:
    from huggingface_hub import constants

    if cache_dir is None:
        env = os.environ.get("HF_HUB_CACHE")
        if env is None and os.environ.get("HF_HOME"):
            env = os.path.join(os.environ["HF_HOME"], "hub")
        cache_dir = env or constants.HF_HUB_CACHE
    offline = (local_files_only or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
               or bool(constants.HF_HUB_OFFLINE))
    endpoint = os.environ.get("HF_ENDPOINT") or None
    return Settings(cache_dir=str(Path(cache_dir).expanduser()),
                     endpoint=endpoint.rstrip("/") if endpoint else None, token=token,
                     offline=offline, force_download=force_download, verify=verify_enabled(verify))


def _endpoint(s: Settings) -> str:
    from huggingface_hub import constants

    return s.endpoint or constants.ENDPOINT


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
                       s: Settings) -> tuple[str, str, str]:
    """Find the first (repo, folder) that has hyperparams.json at ``revision``; verify it."""
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
                path, etag = hf_download(repo_id, folder, HYPERPARAMS, revision, s)
            except GatedRepoError:
                raise HubAccessError(
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
                continue
            except LocalEntryNotFoundError as exc:
                not_cached.append(f"{repo_id}:{folder}")
                if not s.offline:
                    raise online_failure(exc, repo_id, f"{folder}/{HYPERPARAMS}", s) from None
                continue
            verify_file(path, verify=s.verify, etag=etag)
            return path, repo_id, folder
    if not_cached and s.offline:
        raise DownloadError(
            f"{ref.name} is not in the local cache ({s.cache_dir}) and downloads are disabled "
            f"(HF_HUB_OFFLINE=1 or local_files_only=True); looked for {', '.join(not_cached)} "
            f"at revision {revision!r}; {_cache_summary(name, ref, s)[0]}",
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


def _fetch(repo_id: str, folder: str, filename: str, revision: str, s: Settings, *,
           resume: bool = False) -> tuple[str, str | None]:
    """(local path, the ETag announced if it was asked for now) of a required file."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
    )

    try:
        return hf_download(repo_id, folder, filename, revision, s, resume=resume)
    except RemoteEntryNotFoundError:
        raise SaeNotFoundError(
            f"{repo_id}:{folder} has {HYPERPARAMS} but no {filename} at commit {revision}; "
            f"a release folder holds {HYPERPARAMS}, {LM_CONFIG} and {CHECKPOINT}") from None
    except GatedRepoError:
        raise HubAccessError(f"{repo_id} is gated: access to {folder}/{filename} was refused",
                             hint="set HF_TOKEN or pass token=...") from None
    except LocalEntryNotFoundError as exc:
        if s.offline:
            raise DownloadError(
                f"{repo_id}:{folder}/{filename} at commit {revision} is not in the local cache "
                f"({s.cache_dir}) and downloads are disabled (HF_HUB_OFFLINE=1 or "
                "local_files_only=True)",
                hint="unset HF_HUB_OFFLINE and load once online") from None
        raise online_failure(exc, repo_id, f"{folder}/{filename}", s) from None


def _fetch_optional(repo_id: str, folder: str, filename: str, revision: str,
                    s: Settings) -> str | None:
    """lm_config.json is informative only (spec 2.2): a missing one is tolerated; a present
    one is verified like the others."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path, etag = hf_download(repo_id, folder, filename, revision, s)
    except LocalEntryNotFoundError as exc:
        if s.offline:
            return None
        raise online_failure(exc, repo_id, f"{folder}/{filename}", s) from None
    except EntryNotFoundError:
        return None
    verify_file(path, verify=s.verify, etag=etag)
    return path


def hf_download(repo_id: str, folder: str, filename: str, revision: str, s: Settings, *,
                 resume: bool = False) -> tuple[str, str | None]:
    """``hf_hub_download`` of one file, after one quick HEAD when it is not cached.

    Returns (local path, the ETag the Hub announced when it was asked now, else None).
    ``resume``: an LFS file goes through :func:`~llamascope_sdk.loading.resumable.resumable_blob` first.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    path_in_repo = f"{folder}/{filename}" if folder else filename
    etag = None
    if not s.offline and (s.force_download or not _is_cached(repo_id, path_in_repo, revision, s)):
        meta = _probe(repo_id, path_in_repo, revision, s)
        if meta is not None:
            etag = meta.etag
            if resume and _COMMIT.match(revision):
                resumable_blob(repo_id, path_in_repo, meta, cache_dir=s.cache_dir, token=s.token,
                               verify=s.verify)
    try:
        path = hf_hub_download(repo_id, filename, subfolder=folder or None, revision=revision,
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
            f"download of {repo_id}:{path_in_repo} failed: {type(exc).__name__}: {one_line(exc)}",
            hint="check the connection and load again; nothing partial is kept") from None
    return path, etag


def _is_cached(repo_id: str, path_in_repo: str, revision: str, s: Settings) -> bool:
    from huggingface_hub import try_to_load_from_cache

    got = try_to_load_from_cache(repo_id, path_in_repo, cache_dir=s.cache_dir, revision=revision)
    return isinstance(got, str)


def _probe(repo_id: str, path_in_repo: str, revision: str, s: Settings) -> Any:
    """One HEAD for a file that is not cached, without huggingface_hub's retries.

    Returns its ``HfFileMetadata``, or None when the server answered with an error that
    ``hf_hub_download`` should handle (and retry: 5xx, 429).

    Raises:
        Unreachable: no connection (refused, DNS, timeout).
        RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError,
        RemoteEntryNotFoundError: as huggingface_hub raises them.
    """
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(repo_id, path_in_repo, revision=revision, endpoint=s.endpoint)
    timeout = httpx2.Timeout(_PROBE_READ_TIMEOUT, connect=_PROBE_CONNECT_TIMEOUT)
    try:
        return get_hf_file_metadata(url, token=s.token, timeout=timeout,  # type: ignore[arg-type]
                                    endpoint=s.endpoint, retry_on_errors=False)
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
        raise Unreachable(exc) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError):
        raise
    except (httpx2.HTTPError, OSError):  # a server that answered (or half did): hf_hub_download decides
        return None


def online_failure(exc: BaseException, repo_id: str, path_in_repo: str, s: Settings) -> Exception:
    """What a LocalEntryNotFoundError of an online ``hf_hub_download`` means: no connection
    (:class:`Unreachable`, which the caller words with what is cached), else as
    :func:`~llamascope_sdk.loading.hub_errors.translate` says."""
    import httpx2

    cause = exc.__cause__
    if isinstance(cause, (httpx2.ConnectError, httpx2.TimeoutException)):
        return Unreachable(cause)
    return translate(cause or exc, f"could not fetch {repo_id}:{path_in_repo}", endpoint=s.endpoint)


# --------------------------------------------------------------------------- unreachable Hub
def _cache_summary(name: str, ref: SaeRef, s: Settings) -> tuple[str, str | None]:
    repos, folders = _candidates(name, ref)
    shown = ref.name if name.strip() == ref.name else f"{name.strip()} ({ref.name})"
    return cache_summary(shown, repos, folders, s.cache_dir)


def _unreachable_error(name: str, ref: SaeRef, revision: str, s: Settings,
                       cause: BaseException) -> HubUnreachableError:
    shown = ref.name if name.strip() == ref.name else f"{name.strip()} ({ref.name})"
    return unreachable_error(shown, revision, _endpoint(s), cause, _cache_summary(name, ref, s))


# --------------------------------------------------------------------------- provenance
def commit_from_path(path: str) -> str | None:
    parts = Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and _COMMIT.match(parts[i + 1]):
            return parts[i + 1]
    return None
