"""Downloading a checkpoint blob so that an interrupted download resumes, once per cache.

huggingface_hub (since PR #4228) downloads into a per-process temporary file, so a run killed
halfway through a 2 GB checkpoint starts from zero next time. :func:`resumable_blob` keeps the
bytes in ``blobs/<sha256>.llamascope-partial`` instead and continues them with an HTTP Range
request, under a file lock per blob: processes that share the cache (torchrun ranks, job
arrays) wait for the one downloading and then find the finished, verified blob.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import ChecksumMismatchError, DownloadError
from llamascope_sdk.loading.verification import (
    RETRY_HINT,
    SHA256,
    lock_if_writable,
    record_path,
    sha256_file,
    write_record,
)

#: Attempts to continue a cut checkpoint download within one call (each resumes by Range).
_RESUME_ATTEMPTS = 5
#: How long a process waits for another one's checkpoint download (2 GB on a slow link).
_DOWNLOAD_LOCK_TIMEOUT = 6 * 3600.0


def resumable_blob(repo_id: str, path_in_repo: str, meta: Any, *, cache_dir: str,
                   token: str | bool | None, verify: bool) -> None:
    """Put an LFS file's blob into the HF cache, resuming what an interrupted process left.

    huggingface_hub (since PR #4228) downloads into a per-process temporary file, so a run
    killed halfway through a 2 GB checkpoint starts from zero next time. Here the bytes go to
    ``blobs/<sha256>.llamascope-partial``, which a later run continues with an HTTP Range
    request; the finished file is hashed (unless verification is off), its verification
    record written, and it is renamed to ``blobs/<sha256>``, where ``hf_hub_download`` finds
    it and only adds the snapshot link.

    All of this happens under a file lock per blob: processes that share the cache wait for
    the one downloading and then find the blob (without the lock they all appended to the
    same partial file: 416 errors and sha256 mismatches). Files whose ETag is not a sha256
    are left to ``hf_hub_download`` (and refused by verification unless it is off).
    """
    from huggingface_hub.file_download import repo_folder_name

    etag, size = meta.etag, meta.size
    if not etag or not SHA256.match(etag) or size is None:
        return
    repo_folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    blobs = Path(cache_dir) / repo_folder / "blobs"
    blob = blobs / etag
    if blob.exists():
        return
    lock = Path(cache_dir) / ".locks" / repo_folder / f"{etag}.llamascope.lock"
    with lock_if_writable(lock, _DOWNLOAD_LOCK_TIMEOUT, f"downloading {path_in_repo}"):
        if blob.exists():  # another process finished it while this one waited
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
                _continue_download(meta.location, part, size, token, tqdm_desc=path_in_repo)
            except Exception as exc:  # noqa: BLE001 - retried, then reported below
                error = exc
        if not complete():
            got = part.stat().st_size if part.exists() else 0
            raise DownloadError(
                f"download of {repo_id}:{path_in_repo} failed after {got} of {size} bytes "
                f"({_RESUME_ATTEMPTS} attempts): {one_line(error) if error else 'no data'}",
                hint="run the same command again: it resumes from the partial file")
        if verify:
            actual = sha256_file(part)
            if actual != etag:
                part.unlink(missing_ok=True)
                raise ChecksumMismatchError(
                    f"{path_in_repo} from {repo_id}: content sha256 {actual[:12]}... does not match "
                    f"the sha256 {etag[:12]}... announced by the Hub; the corrupt download was deleted",
                    hint=RETRY_HINT)
            # Record the check before the blob appears, so no process hashes it again.
            write_record(record_path(etag), part, actual, etag, as_path=blob)
        os.replace(part, blob)


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


def one_line(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else ""
    return " ".join(text.split()) or type(exc).__name__
