"""The front door: any name or path an SAE is given by, turned into a local folder and its
format, once.

:func:`locate` accepts

* a Llama Scope name in every spelling :func:`~llamascope_sdk.loading.registry.resolve` knows
  (``L12M-32x``, ``l12m_32x``, ``llama3.1-8b/12-llamascope-mlp-131k``,
  ``fnlp/Llama3_1-8B-Base-L12M-32x``, ``repo_id:subfolder``): downloaded by
  :func:`llamascope_sdk.loading.hub.download` (pinned, verified, with the organisation and folder
  fallbacks);
* ``"demo"`` (or the demo's folder name): the bundled SmolLM2 SAE;
* a local folder in any importable format (release, SAELens, Llamascopium, sparsify);
* a Hub repository or a folder of one, in any importable format: ``org/repo``,
  ``org/repo:sub/folder``, ``org/repo/sub/folder`` or ``hf://org/repo/sub/folder``: listed at
  one commit and only the files the format reads downloaded, each verified
  (:mod:`llamascope_sdk.loading.hub_folder`).

The format is detected once, here (:func:`llamascope_sdk.loading.formats.detect`); a folder that
cannot be read gets one line naming the format found and what to do. ``SAE.from_pretrained``
and ``convert`` both enter through here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import SaeNotFoundError
from llamascope_sdk.loading.demo import DEMO_SAE_DIR, DEMO_SAE_NAME, is_demo
from llamascope_sdk.loading.formats import (
    IMPORTABLE,
    UnsupportedFormatError,
    check_importable,
    detect,
    files_to_read,
    folder_files,
)
from llamascope_sdk.loading.hub import Provenance, download
from llamascope_sdk.loading.hub_folder import open_folder
from llamascope_sdk.loading.registry import SaeRef, claims, resolve

_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:[:/](.+?))?/?$")


@dataclass(frozen=True)
class Located:
    """A checkpoint found on this machine.

    Attributes:
        folder: the local folder holding it (in the HF cache for Hub sources).
        format: ``release``, ``saelens``, ``llamascopium`` or ``sparsify``.
        name: a distinct, stable name: the registry name of a Llama Scope release, the
            demo's name, a local release folder's name, the absolute path of a local foreign
            folder, or ``repo_id:subfolder`` of a Hub folder.
        ref: the registry entry, for a Llama Scope name.
        source: provenance (repo, commit, sha256 of each file) for Hub sources.
    """

    folder: Path
    format: str
    name: str
    ref: SaeRef | None
    source: Provenance


def locate(name_or_path: str | os.PathLike[str], *, fmt: str | None = None,
           revision: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
           token: str | bool | None = None, force_download: bool = False,
           local_files_only: bool = False, verify: bool | None = None) -> Located:
    """Find (downloading if needed) the checkpoint ``name_or_path`` names; see the module
    docstring for what is accepted.

    Args:
        fmt: the format, when detection should be skipped (release, saelens, llamascopium,
            sparsify).
        revision, cache_dir, token, force_download, local_files_only, verify: for Hub
            sources, as in :func:`llamascope_sdk.loading.hub.download`.

    Raises:
        UnknownSaeError: a misspelled Llama Scope name, or text that is no name, folder or
            Hub id (the closest names listed).
        SaeNotFoundError: a folder (local or on the Hub) in no format this SDK reads.
        UnsupportedFormatError: a format it recognises but cannot import (one line saying what
            to do: a sparsify root, a circuit-tracer set, Gemma Scope).
        DownloadError and its subclasses: the Hub refused, failed or could not be reached.
    """
    text = os.fspath(name_or_path).strip()
    if fmt is not None and fmt not in IMPORTABLE:
        raise UnsupportedFormatError(f"unknown source format {fmt!r}: allowed are "
                                     f"{', '.join(IMPORTABLE)} (or none, to detect it)")
    if is_demo(text):
        return Located(DEMO_SAE_DIR, "release", DEMO_SAE_NAME, None, Provenance(path=str(DEMO_SAE_DIR)))
    path = Path(text).expanduser()
    if path.exists():
        return _local(path, fmt)
    hub = dict(revision=revision, cache_dir=cache_dir, token=token, force_download=force_download,
               local_files_only=local_files_only, verify=verify)
    if claims(text):
        got = download(text, **hub)  # type: ignore[arg-type]
        return Located(got.folder, "release", got.ref.name if got.ref else text, got.ref, got.source)
    repo, subfolder = hub_id(text)
    return _hub(repo, subfolder, fmt, hub)


def check_name(text: str) -> None:
    """Raise, without any request, for text that can name no SAE (a misspelled Llama Scope
    name, a missing path, nothing Hub-like); the errors :func:`locate` would raise first."""
    if claims(text):
        resolve(text)
    elif not Path(text.strip()).expanduser().exists():
        hub_id(text)


def hub_id(text: str) -> tuple[str, str]:
    """(repo_id, subfolder) of text that is no Llama Scope name and no existing folder,
    checked without any request: what :func:`locate` asks the Hub for.

    Raises:
        SaeNotFoundError: a path (``./x``, ``/x``, ``~/x``) that does not exist.
        UnknownSaeError: text that is neither ``org/repo[:subfolder]`` nor a Llama Scope
            name (the closest names listed).
    """
    text = text.strip()
    if text.startswith((".", "/", "~")) or os.sep in text.replace("/", ""):
        raise SaeNotFoundError(f"{text}: no such folder", hint="give an existing folder, a "
                               "Llama Scope name (e.g. L12R-8x) or a Hub id (org/repo[:subfolder])")
    m = _HUB_ID.match(text)
    if m is None:
        resolve(text)  # raises UnknownSaeError, naming the closest Llama Scope names
        raise AssertionError("resolve accepted a name that registry.claims refused")
    return m.group(1), (m.group(2) or "").strip("/")


def _local(path: Path, fmt: str | None) -> Located:
    where = str(path)
    if path.is_file():
        check_importable(where, "circuit-tracer-layer" if path.suffix == ".safetensors" else None,
                         [path.name])
    files = folder_files(path)
    found = fmt or detect(files, lambda name: _json_or_none(path / name))
    check_importable(where, found, files)
    assert found is not None
    name = path.name if found == "release" else str(path.resolve())
    return Located(path, found, name, None, Provenance(path=str(path)))


def _hub(repo_id: str, subfolder: str, fmt: str | None, hub: dict[str, Any]) -> Located:

    folder = open_folder(repo_id, subfolder, **hub)

    def read_json(name: str) -> Any:
        return _json_or_none(folder.fetch(name)) if name in folder.files else None

    found = fmt or detect(folder.files, read_json)
    check_importable(folder.where, found, folder.files)
    assert found is not None
    for name in files_to_read(found, folder.files):
        folder.fetch(name)
    assert folder.local is not None
    return Located(folder.local, found, folder.where, None, folder.provenance())


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
