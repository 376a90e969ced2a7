"""Files that readers see whole or not at all, and locks for files that processes share.

Every write in the SDK (checkpoints, JSON records, caches, stores) goes through here: data is
written to a temporary sibling, flushed to disk, given the usual mode and renamed into place,
so a killed process leaves either the old file or the complete new one, never a half-written
one. ``file_lock`` serialises processes that share a cache (torchrun ranks, job arrays).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


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


def write_folder(out: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Fill a temporary sibling of ``out`` with ``write(tmp)``, then publish it: a new
    folder appears by one rename; an existing one has each file replaced by a rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write(tmp)
        for d in sorted(p for p in tmp.rglob("*") if p.is_dir()):
            publish_mode(d, directory=True)
        if not out.exists():
            publish_mode(tmp, directory=True)
            os.replace(tmp, out)
            return out
        for src in sorted(p for p in tmp.rglob("*") if p.is_file()):
            dst = out / src.relative_to(tmp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
