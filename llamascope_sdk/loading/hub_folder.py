"""Any folder of any Hub repository, pinned to one commit and verified file by file.

The Llama Scope releases have their own path (:func:`llamascope_sdk.loading.hub.download`, with the
organisation and folder-spelling fallbacks). A foreign checkpoint on the Hub
(``EleutherAI/sae-llama-3-8b-32x:layers.12``, a SAELens or Llamascopium repository, a folder
pushed with ``push_to_hub``) goes through here: :func:`open_folder` asks the Hub once which
commit the revision points to and which files the folder holds; :meth:`HubFolder.fetch` then
downloads one file at that commit through the same ``hf_download`` as the releases (quick HEAD
when not cached, resumable checkpoints, every file checked against the hash the Hub announced).
Nothing is downloaded before the caller knows which files it needs, so a repository's other
SAEs (or a model's 16 GB of weights) stay on the Hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llamascope_sdk.base.atomic import atomic_write_text
from llamascope_sdk.base.errors import DownloadError, SaeNotFoundError
from llamascope_sdk.loading.hub import (
    DEFAULT_REVISION,
    Provenance,
    Settings,
    hf_download,
    online_failure,
    settings,
)
from llamascope_sdk.loading.hub_errors import Unreachable, translate
from llamascope_sdk.loading.verification import SHA1, verify_file

#: Seconds to wait for the Hub's answer to the folder listing.
_LIST_TIMEOUT = 10.0


@dataclass
class HubFolder:
    """One folder of a Hub repository at one commit: its files (paths inside the folder, two
    levels deep) and the files fetched so far (with their sha256)."""

    repo_id: str
    subfolder: str
    revision: str
    commit: str
    files: frozenset[str]
    s: Settings
    fetched: dict[str, str] = field(default_factory=dict)  # name -> sha256
    local: Path | None = None

    @property
    def where(self) -> str:
        return f"{self.repo_id}:{self.subfolder}" if self.subfolder else self.repo_id

    def fetch(self, name: str) -> Path:
        """Download ``name`` (a path inside the folder) at the pinned commit, verified.

        Raises:
            SaeNotFoundError: the folder has no such file.
            DownloadError (and its subclasses), ChecksumMismatchError: as for the releases.
        """
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        if name not in self.files:
            raise SaeNotFoundError(f"{self.where} at commit {self.commit[:12]} has no file {name}")
        head = f"could not download {self.where}/{name}"
        try:
            path, etag = hf_download(self.repo_id, self.subfolder, name, self.commit, self.s,
                                     resume=name.endswith(".safetensors"))
        except Unreachable as exc:
            raise translate(exc, head, endpoint=self.s.endpoint) from None
        except LocalEntryNotFoundError as exc:
            err = online_failure(exc, self.repo_id, name, self.s)
            raise (translate(err, head, endpoint=self.s.endpoint) if isinstance(err, Unreachable)
                   else err) from None
        except HfHubHTTPError as exc:  # gated, removed since the listing: as the Hub said
            raise translate(exc, head, revision=self.commit, endpoint=self.s.endpoint) from None
        self.fetched[name] = verify_file(path, verify=self.s.verify, etag=etag)
        local = Path(path)
        for _ in name.split("/"):
            local = local.parent
        self.local = local
        return Path(path)

    def provenance(self) -> Provenance:
        return Provenance(path=str(self.local) if self.local else None, repo_id=self.repo_id,
                      subfolder=self.subfolder or None, revision=self.revision,
                      commit=self.commit, sha256=dict(self.fetched), verified=self.s.verify)


def open_folder(repo_id: str, subfolder: str = "", *, revision: str | None = None,
                cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                force_download: bool = False, local_files_only: bool = False,
                verify: bool | None = None) -> HubFolder:
    """The files of ``repo_id``'s folder ``subfolder`` at ``revision`` (default main), and
    the commit it resolved to; offline (HF_HUB_OFFLINE=1 or ``local_files_only``), what the
    local cache holds of it.

    Raises:
        SaeNotFoundError: no such repository, revision, or folder.
        HubAccessError, HubUnreachableError, DownloadError: as the Hub answered (or did not).
    """
    s = settings(cache_dir, token, force_download, local_files_only, verify)
    rev = revision or DEFAULT_REVISION
    sub = subfolder.strip("/")
    where = f"{repo_id}:{sub}" if sub else repo_id
    if s.offline:
        commit, names = _cached_listing(repo_id, rev, s)
    else:
        commit, names = _listing(repo_id, rev, s, where)
        _remember_ref(repo_id, rev, commit, s)
    prefix = f"{sub}/" if sub else ""
    files = frozenset(n[len(prefix):] for n in names
                      if n.startswith(prefix) and n[len(prefix):].count("/") <= 1)
    if not files:
        raise SaeNotFoundError(f"{where}: the repository has no folder {sub!r} at revision {rev!r}"
                               + (" in the local cache" if s.offline else ""),
                               hint="check the folder name (repo:subfolder)")
    return HubFolder(repo_id, sub, rev, commit, files, s)


def _listing(repo_id: str, revision: str, s: Settings, where: str) -> tuple[str, list[str]]:
    """(commit, every file path) of the repository at ``revision``, asked of the Hub."""
    import httpx2
    from huggingface_hub import HfApi

    try:
        info = HfApi(endpoint=s.endpoint, token=s.token).model_info(
            repo_id, revision=revision, timeout=_LIST_TIMEOUT)
    except Exception as exc:  # huggingface_hub and httpx raise many classes: translate decides
        if not isinstance(exc, (httpx2.HTTPError, OSError)):
            raise
        raise translate(exc, f"could not open {where}", revision=revision,
                        endpoint=s.endpoint) from None
    return str(info.sha), [sib.rfilename for sib in info.siblings or []]


def _remember_ref(repo_id: str, revision: str, commit: str, s: Settings) -> None:
    """Record in the HF cache which commit ``revision`` pointed to (``refs/<revision>``, as
    ``hf_hub_download`` does for a branch), so that an offline load finds the snapshot: the
    files themselves are fetched by commit."""
    import contextlib

    from huggingface_hub.file_download import repo_folder_name


    if revision == commit:
        return
    ref = Path(s.cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / revision
    with contextlib.suppress(OSError):  # a read-only shared cache: offline loads pin a commit
        atomic_write_text(ref, commit)


def _cached_listing(repo_id: str, revision: str, s: Settings) -> tuple[str, list[str]]:
    """(commit, file paths) of the snapshot the local cache holds for ``revision``."""
    from huggingface_hub.file_download import repo_folder_name

    root = Path(s.cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = root / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = root / "snapshots" / commit
    if not SHA1.match(commit) or not snap.is_dir():

        raise DownloadError(
            f"{repo_id} at revision {revision!r} is not in the local cache ({s.cache_dir}) and "
            "downloads are disabled (HF_HUB_OFFLINE=1 or local_files_only=True)",
            hint="unset HF_HUB_OFFLINE and load it once online, or point HF_HUB_CACHE at a warm cache")
    return commit, [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()]
