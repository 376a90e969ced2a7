"""Checking downloaded files against what the Hub announced, and remembering the checks.

Every file is checked against what the Hub announced for it, which is the name of its blob in
the HF cache (``hf_hub_download`` names blobs by the ETag): the sha256 for LFS files (the
checkpoint), the git blob sha1 (``sha1(b"blob <size>\\0" + data)``) for regular files
(hyperparams.json, lm_config.json). A mismatch raises :class:`ChecksumMismatchError`; an ETag
that is neither hash (a mirror that rewrites ETags) raises :class:`UnverifiableDownloadError`.
Either way the blob and its snapshot link are removed, so a plain re-run downloads the file
afresh. A small record under ``paths.verified_dir()`` remembers each check, so later loads do
not re-hash 0.5-2 GB; records are read and written under a file lock, so processes sharing a
cache hash a file once. Opt-out, for mirrors that rewrite ETags only: ``LLAMASCOPE_VERIFY=0``
or ``verify=False`` (the content is then trusted unchecked).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import atomic_write_text, file_lock
from llamascope_sdk.base.errors import (
    ChecksumMismatchError,
    DownloadError,
    UnverifiableDownloadError,
)
from llamascope_sdk.base.paths import verified_dir

#: Environment variable that turns content verification off ("0", "false", "no", "off").
VERIFY_ENV = "LLAMASCOPE_VERIFY"
SHA256 = re.compile(r"^[0-9a-f]{64}$")
SHA1 = re.compile(r"^[0-9a-f]{40}$")
_FALSE = {"0", "off", "no", "false"}
#: How long a process waits for another one to hash a checkpoint.
_VERIFY_LOCK_TIMEOUT = 3600.0


def verify_enabled(verify: bool | None = None) -> bool:
    """``verify`` if given, else False when $LLAMASCOPE_VERIFY is 0/false/no/off, else True."""
    if verify is not None:
        return bool(verify)
    return os.environ.get(VERIFY_ENV, "").strip().lower() not in _FALSE


@contextlib.contextmanager
def lock_if_writable(path: Path, timeout: float, what: str) -> Iterator[None]:
    """:func:`atomic.file_lock`, or nothing where the folder is read-only (a shared, read-only
    cache is only read: there is nothing to serialise)."""
    from filelock import Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(path.parent, os.W_OK)
    except OSError:
        writable = False
    with contextlib.ExitStack() as stack:
        if writable:
            try:
                stack.enter_context(file_lock(path, timeout=timeout))
            except Timeout:
                raise DownloadError(
                    f"waited {timeout:.0f} s for another process {what} (lock {path})",
                    hint="if no other process is running, delete the lock file and load again") from None
        yield


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data``: what the Hub announces as the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _digests(path: Path, git: bool) -> tuple[str, str | None]:
    """(sha256, git blob sha1 if asked) of a file, in one pass."""
    sha256 = hashlib.sha256()
    sha1 = None
    if git:
        sha1 = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(16 << 20):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


def record_path(key: str) -> Path:
    return verified_dir() / f"{key}.json"


def write_record(record: Path, data: Path, sha256: str, verified: str | None,
                  as_path: Path | None = None) -> None:
    st = data.stat()
    stamp = {"blob": str(as_path or data), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError):  # a read-only SDK cache only costs a re-hash next time
        atomic_write_text(record, json.dumps({**stamp, "sha256": sha256, "verified": verified}) + "\n")


RETRY_HINT = ("load again: the bad file was removed from the cache, so the next load downloads it "
               "afresh; if it repeats, the Hub or the mirror in HF_ENDPOINT serves altered data")
_OPT_OUT_HINT = (f"if HF_ENDPOINT is a mirror that rewrites ETags, turn verification off with "
                 f"{VERIFY_ENV}=0 (or verify=False); the content is then trusted unchecked")


def verify_file(path: str | Path, *, verify: bool = True, etag: str | None = None) -> str:
    """sha256 of a cached file, checked against the hash the Hub announced for it.

    The announcement is the name of the file's blob in the HF cache (``hf_hub_download``
    names blobs by the ETag; in a cache without symlinks, the ETag from the HEAD request just
    made, ``etag``): a sha256 (LFS files) or a git blob sha1 (regular files). A check is
    remembered by (announcement, blob path, size, mtime), so a file is hashed once; the
    record is read and written under a file lock, so processes sharing the cache hash it once.

    Raises:
        ChecksumMismatchError: the content does not hash to the announcement.
        UnverifiableDownloadError: the announcement is no hash (or unknown).
        Both remove the blob and its snapshot link first.
    """
    link = Path(path)
    blob = Path(os.path.realpath(link))
    in_blobs = link.is_symlink() or blob.parent.name == "blobs"
    announced = blob.name if in_blobs else (etag or None)
    hashlike = announced is not None and bool(SHA256.match(announced) or SHA1.match(announced))
    key = announced if in_blobs and hashlike else hashlib.sha256(str(blob).encode()).hexdigest()
    record = record_path(str(key))
    with lock_if_writable(record.with_suffix(".lock"), _VERIFY_LOCK_TIMEOUT, f"checking {link.name}"):
        try:
            st = blob.stat()
        except FileNotFoundError:
            raise ChecksumMismatchError(
                f"{link.name} in {link.parent} vanished while being checked: another process "
                "found it corrupt and removed it", hint=RETRY_HINT) from None
        stamp = {"blob": str(blob), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            known: dict[str, Any] = json.loads(record.read_text())
        except (OSError, ValueError):
            known = {}
        same = {k: known.get(k) for k in stamp} == stamp and isinstance(known.get("sha256"), str)
        if same and (not verify
                     or (announced is not None and announced in (known.get("verified"), known["sha256"]))
                     or (announced is None and known.get("verified"))):  # no symlinks: checked at download
            return str(known["sha256"])
        if verify and not hashlike:
            removed = _remove(blob, link)
            shown = "none" if announced is None else repr(announced)
            raise UnverifiableDownloadError(
                f"{link.name} from {link.parent}: the Hub at its endpoint announced ETag {shown}, "
                f"which is neither a sha256 nor a git blob sha1, so the content cannot be checked; "
                f"{removed}", hint=_OPT_OUT_HINT)
        sha256, sha1 = _digests(blob, git=bool(verify and announced and SHA1.match(announced)))
        if verify:
            assert announced is not None
            kind, actual = ("sha256", sha256) if SHA256.match(announced) else ("git blob sha1", sha1)
            if actual != announced:
                removed = _remove(blob, link)
                raise ChecksumMismatchError(
                    f"{link.name} from {link.parent}: content {kind} {str(actual)[:12]}... does not "
                    f"match the {kind} {announced[:12]}... announced by the Hub; {removed}",
                    hint=RETRY_HINT)
        write_record(record, blob, sha256, announced if verify else None)
        return sha256


def _remove(blob: Path, link: Path) -> str:
    """Delete a bad blob and its snapshot link; say so (or what to delete by hand)."""
    left = []
    for p in (blob, link):
        try:
            p.unlink(missing_ok=True)
        except OSError:  # a read-only shared cache
            left.append(str(p))
    return ("the file was removed from the cache" if not left
            else f"it could not be removed (read-only cache): delete {' and '.join(left)}")


def verify_checkpoint(path: str | Path, *, verify: bool = True, etag: str | None = None) -> str:
    """sha256 of a cached checkpoint, hashing it only the first time it is seen.

    The blob name of an LFS file in the HF cache is the sha256 that the server announced. A
    verified blob is remembered by (sha256, blob path, size, mtime); a new or replaced blob
    is hashed once. A mismatch, or an announcement that is no hash, deletes the blob and its
    snapshot link (see :func:`verify_file`); ``verify=False`` only computes the sha256.

    Raises:
        ChecksumMismatchError, UnverifiableDownloadError (both CorruptCheckpointError).
    """
    return verify_file(path, verify=verify, etag=etag)
