"""What a failed Hub request means, said once: huggingface_hub's errors (also wrapped in
transformers' OSError) turned into the SDK's, chosen by the class of the error behind them,
never by the words of its message.

Used by every Hub path: SAE downloads (:mod:`.hub`), language models (:mod:`.models`) and
repositories of foreign checkpoints (:mod:`.locate`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from llamascope_sdk.base.errors import (
    DownloadError,
    HubAccessError,
    HubUnreachableError,
    SaeNotFoundError,
)
from llamascope_sdk.loading.release import CHECKPOINT, HYPERPARAMS
from llamascope_sdk.loading.resumable import one_line

_TRUE = {"1", "on", "yes", "true"}


class Unreachable(Exception):
    """Internal: the Hub could not be reached (no connection) for a file that is not cached."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def endpoint_url(endpoint: str | None = None) -> str:
    """The Hub endpoint in use: ``endpoint``, $HF_ENDPOINT, or huggingface_hub's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or any(
        os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cause(exc: BaseException) -> BaseException | None:
    """The huggingface_hub (or HTTP client) error behind ``exc`` (itself included), if any."""
    import httpx2
    from huggingface_hub.errors import (
        FileMetadataError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                            FileMetadataError, httpx2.HTTPError)):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def translate(exc: BaseException, head: str, *, revision: str | None = None,
              endpoint: str | None = None, missing: type[DownloadError] | type[SaeNotFoundError] = SaeNotFoundError,
              example: str = "", tail: str = "") -> Exception:
    """The SDK error for a failed Hub request.

    Args:
        exc: what huggingface_hub (or transformers) raised.
        head: what was being fetched, e.g. ``"could not load model 'x'"``; every message
            starts with it.
        revision: the revision asked for (named when it does not exist).
        endpoint: the endpoint used (default $HF_ENDPOINT or the Hub).
        missing: the class for a repository or revision that does not exist.
        example: an id that would work (named in the hint for an unknown repository).
        tail: appended to every hint (e.g. "or use --model smollm2-135m").
    """
    import httpx2
    from huggingface_hub.errors import (
        FileMetadataError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = endpoint_url(endpoint)
    more = f"; {tail}" if tail else ""
    cause = hub_cause(exc) or exc
    if isinstance(cause, GatedRepoError):
        return HubAccessError(
            f"{head}: it is gated on the Hub ({url}) and the token sent may not read it",
            hint=f"accept the licence on the model page, then set HF_TOKEN (or run `hf auth login`){more}")
    if isinstance(cause, RevisionNotFoundError):
        return missing(f"{head}: revision {revision!r} not found on {url}",
                       hint="use a branch, tag or commit sha of that repository")
    if isinstance(cause, RepositoryNotFoundError):
        check = f"check the id (e.g. {example})" if example else "check the id"
        return missing(f"{head}: it is neither a local folder nor a repository on the Hub ({url})",
                       hint=f"{check}; a private repository needs HF_TOKEN{more}")
    if isinstance(cause, OfflineModeIsEnabled) or (isinstance(cause, LocalEntryNotFoundError) and offline()):
        return DownloadError(
            f"{head}: it is not in the local cache and downloads are disabled (HF_HUB_OFFLINE=1)",
            hint=f"unset HF_HUB_OFFLINE and load it once online, or point HF_HUB_CACHE at a warm cache{more}")
    inner = cause.__cause__ if isinstance(cause, LocalEntryNotFoundError) else cause
    if isinstance(inner, Unreachable):
        inner = inner.cause
    if isinstance(inner, (httpx2.ConnectError, httpx2.TimeoutException)):
        return HubUnreachableError(
            f"{head}: could not reach the Hub at {url}, and it is not cached "
            f"({type(inner).__name__}: {one_line(inner)})",
            hint="check the connection, set HF_ENDPOINT to a reachable mirror, or point "
                 f"HF_HUB_CACHE at a warm cache{more}")
    if isinstance(inner, HfHubHTTPError) and inner.response is not None:
        return DownloadError(
            f"{head}: the Hub at {url} answered HTTP {inner.response.status_code} (after retries), "
            "and it is not cached",
            hint=f"the Hub or mirror is failing: try again later, or set HF_ENDPOINT to another mirror{more}")
    if isinstance(inner, FileMetadataError):
        return DownloadError(
            f"{head}: {url} answered without the Hub's headers (commit, ETag): {one_line(inner)}",
            hint=f"check that HF_ENDPOINT points to a Hugging Face Hub (or a mirror of it), and the proxy{more}")
    return DownloadError(f"{head}: {one_line(inner or exc)}",
                         hint=f"check the id or folder, the connection and HF_ENDPOINT{more}")


def cache_summary(shown: str, repos: list[str], folders: list[str],
                  cache_dir: str) -> tuple[str, str | None]:
    """(what the cache holds of a release folder, in words; a revision that loads a complete
    copy), over the candidate repositories and folder spellings."""
    from huggingface_hub.file_download import repo_folder_name

    complete: list[str] = []
    partial: list[str] = []
    usable: str | None = None
    for repo_id in repos:
        root = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
        refs: dict[str, list[str]] = {}
        with contextlib.suppress(OSError):
            for f in sorted((root / "refs").rglob("*")):
                if f.is_file():
                    refs.setdefault(f.read_text().strip(), []).append(f.relative_to(root / "refs").as_posix())
        snapshots = sorted((root / "snapshots").glob("*")) if (root / "snapshots").is_dir() else []
        for snap in snapshots:
            for folder in folders:
                hp, ckpt = snap / folder / HYPERPARAMS, snap / folder / CHECKPOINT
                if not hp.exists():
                    continue
                names = refs.get(snap.name, [])
                label = f"{repo_id}:{folder} at commit {snap.name[:12]}" + (
                    f" (revision {', '.join(repr(n) for n in names)})" if names else "")
                if ckpt.exists():
                    complete.append(label)
                    usable = usable or (names[0] if names else snap.name)
                else:
                    partial.append(label + " without its weights")
    if not complete and not partial:
        return f"no copy of {shown} in {cache_dir}", None
    return f"cached in {cache_dir}: {'; '.join(complete + partial)}", usable


def unreachable_error(shown: str, revision: str, endpoint: str, cause: BaseException,
                      cached: tuple[str, str | None]) -> HubUnreachableError:
    """No connection to the Hub for an SAE: what the cache holds, and how to load it."""
    held, usable = cached
    message = (f"could not reach the Hub at {endpoint} to download {shown} at revision "
               f"{revision!r} ({type(cause).__name__}: {one_line(cause)}); {held}")
    if usable is not None:
        pin = "" if usable == revision else f" with revision={usable!r}"
        hint = (f"to load the cached copy, set HF_HUB_OFFLINE=1 (or pass local_files_only=True){pin}; "
                "or set HF_ENDPOINT to a reachable mirror")
    else:
        hint = ("check the connection, set HF_ENDPOINT to a reachable mirror, or point "
                "HF_HUB_CACHE at a warm cache that holds this SAE")
    return HubUnreachableError(message, hint=hint)
