"""The file names of every SAE folder layout the SDK reads or writes, telling a folder's format
from its file names, and whether a folder may be replaced by a save (the SDK's own mark).

This module sits below every format module (they take their file names from here), so that
:mod:`~llamascope_sdk.loading.formats._build` can check a folder's ownership without importing
the format modules that build on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import FolderNotOwnedError
from llamascope_sdk.loading.release import CHECKPOINT, FORMAT_VERSION, RELEASE_OPTIONAL

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
LLAMASCOPIUM_CONFIG = "config.json"
LLAMASCOPIUM_WEIGHTS = "sae_weights.safetensors"
CIRCUIT_TRACER_CONFIG = "config.yaml"

#: Every file of the SAE folder layouts the SDK writes (release, SAELens, Llamascopium,
#: circuit-tracer), by path inside the folder; circuit-tracer's layer files match _LAYER.
SAE_LAYOUT_FILES = frozenset({
    "hyperparams.json", "lm_config.json", CHECKPOINT, *RELEASE_OPTIONAL,
    SAELENS_CFG, SAELENS_WEIGHTS, LLAMASCOPIUM_CONFIG, CIRCUIT_TRACER_CONFIG})
_LAYER = re.compile(r"^layer_\d+\.safetensors$")
#: The mark an export leaves (a key of its config or safetensors metadata) that says the SDK wrote it.
SDK_MARK = "llamascope_sdk"


def is_llamascopium_config(cfg: Any) -> bool:
    """Whether a parsed ``config.json`` is a Llamascopium SAE's (a transformers model's is not)."""
    return isinstance(cfg, dict) and "hook_point_in" in cfg and ("d_model" in cfg or "sae_type" in cfg)


def folder_files(folder: Path) -> frozenset[str]:
    """The files a format can be told by: those in ``folder`` and in its subfolders (two
    levels: ``checkpoints/final.safetensors``, a sparsify root's ``layers.12/cfg.json``)."""
    return frozenset(p.relative_to(folder).as_posix() for pattern in ("*", "*/*")
                     for p in folder.glob(pattern) if p.is_file())


def detect(files: Collection[str], read_json: Callable[[str], Any]) -> str | None:
    """The format of a folder from the names of its files (:func:`folder_files`, or a Hub
    listing) and, for a ``config.json``, its content (``read_json(name)``: the parsed file,
    or None): ``release``, ``saelens``, ``llamascopium``, ``sparsify``, ``sparsify-root`` (a
    folder of hookpoint folders), ``circuit-tracer``, ``gemma-scope`` (params.npz) or None."""
    top = {f for f in files if "/" not in f}
    if "hyperparams.json" in top:
        return "release"
    if {SAELENS_CFG, SAELENS_WEIGHTS} <= top:
        return "saelens"
    if {SPARSIFY_CFG, SPARSIFY_WEIGHTS} <= top:
        return "sparsify"
    if (LLAMASCOPIUM_CONFIG in top and any(f.endswith(".safetensors") for f in top)
            and is_llamascopium_config(read_json(LLAMASCOPIUM_CONFIG))):
        return "llamascopium"
    if CIRCUIT_TRACER_CONFIG in top and any(_LAYER.match(f) for f in top):
        return "circuit-tracer"
    if "params.npz" in top:
        return "gemma-scope"
    if hookpoints(files):
        return "sparsify-root"
    return None


def detect_format(folder: str | Path) -> str | None:
    """:func:`detect` for a local folder (``circuit-tracer-layer`` for one layer file)."""
    folder = Path(folder)
    if folder.is_file():
        return "circuit-tracer-layer" if folder.suffix == ".safetensors" else None
    if not folder.is_dir():
        return None
    return detect(folder_files(folder), lambda name: _json_or_none(folder / name))


def hookpoints(files: Collection[str]) -> list[str]:
    """The subfolders that hold one sparsify sparse coder each (cfg.json + sae.safetensors)."""
    return sorted(d for d in {f.split("/")[0] for f in files if "/" in f}
                  if f"{d}/{SPARSIFY_CFG}" in files and f"{d}/{SPARSIFY_WEIGHTS}" in files)


def _json_or_none(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def replaceable_sae_folder(folder: Path) -> None:
    """Raise unless ``folder`` may be replaced whole by an SAE save (release, conversion):
    every file in it belongs to an SAE folder layout, and the SAE in it was written by this SDK
    (its checkpoint or config carries the SDK's mark). A folder holding anything else (a
    user's notes, a model, a checkpoint from another tool) is refused, never emptied.

    Raises:
        FolderNotOwnedError: the message names the files or the format that are not the SDK's.
    """
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    other = [f for f in files if f not in SAE_LAYOUT_FILES and not _LAYER.match(f)]
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise FolderNotOwnedError(
            f"{folder} holds files that are no part of an SAE folder ({shown}); a save replaces "
            "its folder whole, so it writes only into a new or empty folder or over an SAE "
            "folder that llamascope-sdk wrote")
    found = detect_format(folder)
    if found is None or not _written_by_sdk(folder, found):
        what = f"a {found} folder" if found else f"files ({', '.join(files[:5])})"
        raise FolderNotOwnedError(
            f"{folder} holds {what} that llamascope-sdk did not write; a save replaces only "
            "a new or empty folder or an SAE folder the SDK wrote itself")


def _written_by_sdk(folder: Path, fmt: str) -> bool:
    """Whether the SDK's mark is on the SAE in ``folder`` (format ``fmt``)."""
    if fmt == "release":
        return _safetensors_metadata(folder / CHECKPOINT).get("version") == FORMAT_VERSION
    if fmt == "circuit-tracer":
        layer = _safetensors_metadata(folder / "layer_0.safetensors")
        return SDK_MARK in layer or "source" in layer  # "source": sets written before the mark
    config = {"saelens": SAELENS_CFG, "llamascopium": LLAMASCOPIUM_CONFIG}.get(fmt)
    if config is None:
        return False
    try:
        cfg = json.loads((folder / config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    meta = cfg.get("metadata") if fmt == "saelens" and isinstance(cfg, dict) else cfg
    return isinstance(meta, dict) and isinstance(meta.get(SDK_MARK), dict)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:  # unreadable: not provably the SDK's
        return {}
