"""Foreign checkpoint formats: one module per tool, plus folder detection.

=================  ======================================  ======  ======
format             folder                                  import  export
=================  ======================================  ======  ======
release            hyperparams.json + checkpoints/         yes     yes
saelens            cfg.json + sae_weights.safetensors      yes     yes
llamascopium       config.json + sae_weights.safetensors   yes     yes
sparsify           cfg.json + sae.safetensors (per hook)   yes     no
circuit-tracer     config.yaml + layer_L.safetensors       no      yes (transcoder sets)
=================  ======================================  ======  ======

:func:`detect` names what a folder holds, from its file names (a local folder's or a Hub
listing's), once per load (:mod:`llamascope_sdk.locate` calls it);
:func:`check_importable` refuses the others in one line naming the format found and what to do;
:func:`files_to_read` says which files an import reads (all a Hub folder downloads);
:func:`read_foreign` reads a foreign folder into a :class:`Plain` record (which
``SAE.from_plain`` builds an SAE from). This
package never imports :mod:`llamascope_sdk.sae`: the exporters read an SAE through the
:class:`Exportable` protocol.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from llamascope_sdk.errors import FolderNotOwnedError, SaeNotFoundError
from llamascope_sdk.release import CHECKPOINT, FORMAT_VERSION, RELEASE_OPTIONAL

from . import circuit_tracer, llamascopium, saelens, sparsify
from ._build import Exportable, Plain, UnsupportedFormatError, collapse_threshold

IMPORTABLE = ("release", "saelens", "llamascopium", "sparsify")
EXPORTABLE = ("release", "saelens", "llamascopium", "circuit-tracer")

__all__ = ["EXPORTABLE", "IMPORTABLE", "Exportable", "Plain", "UnsupportedFormatError",
           "check_importable", "collapse_threshold", "detect", "detect_format", "files_to_read",
           "folder_files", "read_foreign", "replaceable_sae_folder"]

#: Every file of the SAE folder layouts the SDK writes (release, SAELens, Llamascopium,
#: circuit-tracer), by path inside the folder; circuit-tracer's layer files match _LAYER.
SAE_LAYOUT_FILES = frozenset({
    "hyperparams.json", "lm_config.json", CHECKPOINT, *RELEASE_OPTIONAL,
    saelens.CFG, saelens.WEIGHTS, llamascopium.CONFIG, circuit_tracer.CONFIG})
_LAYER = re.compile(r"^layer_\d+\.safetensors$")
#: The mark an export leaves (a key of its config or safetensors metadata) that says the SDK wrote it.
SDK_MARK = "llamascope_sdk"


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
    if {saelens.CFG, saelens.WEIGHTS} <= top:
        return "saelens"
    if {sparsify.CFG, sparsify.WEIGHTS} <= top:
        return "sparsify"
    if (llamascopium.CONFIG in top and any(f.endswith(".safetensors") for f in top)
            and llamascopium.is_config(read_json(llamascopium.CONFIG))):
        return "llamascopium"
    if circuit_tracer.CONFIG in top and any(_LAYER.match(f) for f in top):
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
                  if f"{d}/{sparsify.CFG}" in files and f"{d}/{sparsify.WEIGHTS}" in files)


def files_to_read(fmt: str, files: Collection[str]) -> list[str]:
    """The files an import of format ``fmt`` reads, of those a folder has (what a Hub folder
    downloads: nothing else, so a repository's other SAEs and models stay on the Hub)."""
    if fmt == "release":
        return [f for f in ("hyperparams.json", "lm_config.json", CHECKPOINT, *RELEASE_OPTIONAL)
                if f in files]
    if fmt == "saelens":
        return [saelens.CFG, saelens.WEIGHTS]
    if fmt == "sparsify":
        return [sparsify.CFG, sparsify.WEIGHTS]
    if fmt == "llamascopium":
        weights = [f for f in files if "/" not in f and f.endswith(".safetensors")]
        return [llamascopium.CONFIG, llamascopium.WEIGHTS if llamascopium.WEIGHTS in weights
                else sorted(weights)[0]]
    return []


def check_importable(where: str, found: str | None, files: Collection[str]) -> None:
    """Raise the one-line error for a folder whose format (``found``) cannot be imported,
    naming the format and what to do; nothing for the importable ones (:data:`IMPORTABLE`)."""
    if found in IMPORTABLE:
        return
    convert = f"llamascope convert {where} --to release OUT"
    if found == "sparsify-root":
        points = hookpoints(files)
        sep = ":" if ":" not in where and not Path(where).exists() else "/"
        raise UnsupportedFormatError(
            f"{where} is a sparsify checkpoint with {len(points)} hookpoint folders "
            f"({', '.join(points[:4])}{', ...' if len(points) > 4 else ''}); one SAE is one of them",
            hint=f"load {where}{sep}{points[0]}, or `llamascope convert {where}{sep}{points[0]} "
                 "--to release OUT`")
    if found == "circuit-tracer":
        raise UnsupportedFormatError(
            f"{where} is a circuit-tracer transcoder set (config.yaml + layer_L.safetensors); "
            "llamascope-sdk writes this format but does not read it back",
            hint="load the Llama Scope transcoders it came from (e.g. SAE.from_pretrained('L12TC-8x'))")
    if found == "circuit-tracer-layer":
        raise UnsupportedFormatError(
            f"{where} is one file (a circuit-tracer layer file?); an SAE is a folder",
            hint="give the folder of a release, SAELens, Llamascopium or sparsify checkpoint")
    if found == "gemma-scope":
        raise UnsupportedFormatError(
            f"{where} holds a Gemma Scope params.npz, which llamascope-sdk does not read",
            hint=f"convert it with SAELens to cfg.json + sae_weights.safetensors, then `{convert}`")
    shown = sorted(files)
    what = ", ".join(shown[:8]) + (", ..." if len(shown) > 8 else "") if shown else "nothing"
    raise SaeNotFoundError(
        f"{where} is not a checkpoint folder this SDK can read (found: {what}); expected the "
        "Llama Scope release layout (hyperparams.json + checkpoints/final.safetensors), SAELens "
        "(cfg.json + sae_weights.safetensors), Llamascopium (config.json + sae_weights.safetensors) "
        "or sparsify (cfg.json + sae.safetensors)",
        hint="give a folder in one of these formats, or a Llama Scope name such as L12R-8x")


def read_foreign(folder: str | Path, fmt: str, **options: Any) -> Plain:
    """Read a folder in a foreign format ``fmt`` (``saelens``, ``llamascopium`` or
    ``sparsify``, as :func:`detect` named it) into a :class:`Plain` record; ``SAE.from_plain``
    builds the SAE. ``options`` go to the format's reader (``hook_point``, ``rmsnorm_gain``
    for sparsify; ``norm_scaling_factor`` for SAELens)."""
    folder = Path(folder)
    if fmt == "saelens":
        return saelens.read(folder, **_pick(options, "norm_scaling_factor"))
    if fmt == "llamascopium":
        return llamascopium.read(folder)
    if fmt == "sparsify":
        return sparsify.read(folder, **_pick(options, "hook_point", "rmsnorm_gain"))
    raise UnsupportedFormatError(f"{folder}: format {fmt!r} is not a foreign format this SDK "
                                 "reads (saelens, llamascopium, sparsify)")


def _pick(options: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in names and v is not None}


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
    config = {"saelens": saelens.CFG, "llamascopium": llamascopium.CONFIG}.get(fmt)
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
