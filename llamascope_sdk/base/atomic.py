"""Files that readers see whole or not at all, and locks for files that processes share.

Every write in the SDK (checkpoints, JSON records, caches, stores) goes through here: data is
written to a temporary sibling, flushed to disk, given the usual mode and renamed into place,
so a killed process leaves either the old file or the complete new one, never a half-written
one. Folders (a release, a conversion, the converted model) are written whole the same way
by :func:`write_folder`, which replaces a folder only where its owner says every file in it
is the SDK's own. ``file_lock`` serialises processes that share a cache (torchrun ranks, job arrays).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llamascope_sdk.base.errors import FolderNotOwnedError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; give the final entry the usual mode (umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that readers see either the old file or the complete new one."""
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(data)

    _atomic_write(Path(path), write)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) so that readers see either the old file or the complete new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and a rename."""
    from safetensors.torch import save_file

    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(contiguous, tmp, metadata=metadata))


#: ``renameat2`` flag that swaps two paths in one step (Linux 3.15+, glibc 2.28+).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing folders in one atomic step; False where the system cannot."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rename2 = libc.renameat2
    except (OSError, AttributeError, TypeError):  # no libc handle (Windows), no renameat2 (macOS)
        return False
    return rename2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def check_replaceable(out: str | os.PathLike[str],
                      replaceable: Callable[[Path], None] | None = None) -> Path:
    """Check, before any work, that :func:`write_folder` may write ``out``: it does not
    exist, is an empty folder, or ``replaceable(out)`` accepts it (it raises otherwise).

    Raises:
        FolderNotOwnedError: ``out`` is a file, or a non-empty folder nobody accepted.
    """

    out = Path(out).expanduser()
    if out.is_symlink():
        out = out.resolve()
    if not out.exists():
        return out
    if not out.is_dir():
        raise FolderNotOwnedError(f"{out} is a file, not a folder; give a folder to write")
    if not any(out.iterdir()):
        return out
    if replaceable is None:
        raise FolderNotOwnedError(f"{out} is not empty; give a new or empty folder")
    replaceable(out)
    return out


def write_folder(out: str | os.PathLike[str], write: Callable[[Path], None], *,
                 replaceable: Callable[[Path], None] | None = None) -> Path:
    """The one way the SDK writes a folder: whole, in one atomic step, owning its content.

    ``write(tmp)`` fills a temporary sibling of ``out``; the sibling then takes the place of
    ``out``. A new folder appears by one rename; an existing one is swapped with it in one
    step (``renameat2(RENAME_EXCHANGE)``; where the system lacks it, two renames, so that a
    reader sees the old folder, then briefly none, then the new one). Either way a reader
    never sees a mix: the files of the old folder that ``write`` did not produce are gone.

    Because the old folder goes whole, ``out`` must be a new or empty folder, or one that
    ``replaceable(out)`` accepts: it raises (before anything is written) unless every file
    in it is the SDK's own output of that kind. Files a user put there are never deleted:
    such a folder is refused.

    Raises:
        FolderNotOwnedError: ``out`` is a file or a folder ``replaceable`` refused.
    """
    out = check_replaceable(out, replaceable)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        for d in sorted(p for p in tmp.rglob("*") if p.is_dir()):
            publish_mode(d, directory=True)
        publish_mode(tmp, directory=True)
        if not out.exists():
            os.replace(tmp, out)
            return out
        check_replaceable(out, replaceable)  # again: the folder may have changed meanwhile
        if not _exchange(tmp, out):
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "folder")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old folder


@contextlib.contextmanager
def file_lock(path: str | Path, *, timeout: float = 3600.0) -> Iterator[None]:
    """Hold an inter-process lock on ``path`` (a ``.lock`` file beside the data it guards).

    ``filelock`` comes with huggingface_hub. The lock is released when the process dies, so a
    killed holder never blocks the others. ``timeout`` bounds the wait (seconds).
    """
    from filelock import FileLock

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout):
        yield
