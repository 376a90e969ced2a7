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

:func:`detect_format` names what a folder holds; :func:`read_foreign` reads the formats that
can be imported into a :class:`Plain` record (which ``SAE.from_plain`` builds an SAE from) and
otherwise raises an error naming the format found and the command that converts it. This
package never imports :mod:`llamascope_sdk.sae`: the exporters read an SAE through the
:class:`Exportable` protocol.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llamascope_sdk.errors import FolderNotOwnedError, SaeNotFoundError
from llamascope_sdk.release import CHECKPOINT, FORMAT_VERSION, RELEASE_OPTIONAL

from . import circuit_tracer, llamascopium, saelens, sparsify
from ._build import Exportable, Plain, UnsupportedFormatError, collapse_threshold, resolve_source

IMPORTABLE = ("release", "saelens", "llamascopium", "sparsify")
EXPORTABLE = ("release", "saelens", "llamascopium", "circuit-tracer")

__all__ = ["EXPORTABLE", "IMPORTABLE", "Exportable", "Plain", "UnsupportedFormatError",
           "collapse_threshold", "detect_format", "read_foreign", "replaceable_sae_folder",
           "resolve_source"]

#: Every file of the SAE folder layouts the SDK writes (release, SAELens, Llamascopium,
#: circuit-tracer), by path inside the folder; circuit-tracer's layer files match _LAYER.
SAE_LAYOUT_FILES = frozenset({
    "hyperparams.json", "lm_config.json", CHECKPOINT, *RELEASE_OPTIONAL,
    saelens.CFG, saelens.WEIGHTS, llamascopium.CONFIG, circuit_tracer.CONFIG})
_LAYER = re.compile(r"^layer_\d+\.safetensors$")
#: The mark an export leaves (a key of its config or safetensors metadata) that says the SDK wrote it.
SDK_MARK = "llamascope_sdk"


def detect_format(folder: str | Path) -> str | None:
    """``release``, ``saelens``, ``llamascopium``, ``sparsify``, ``sparsify-root`` (a folder of
    hookpoint folders), ``circuit-tracer``, ``gemma-scope`` (params.npz) or None."""
    folder = Path(folder)
    if folder.is_file():
        return "circuit-tracer-layer" if folder.suffix == ".safetensors" else None
    if not folder.is_dir():
        return None
    if (folder / "hyperparams.json").is_file():
        return "release"
    if saelens.is_saelens(folder):
        return "saelens"
    if sparsify.is_sparsify(folder):
        return "sparsify"
    if llamascopium.is_llamascopium(folder):
        return "llamascopium"
    if (folder / circuit_tracer.CONFIG).is_file() and any(folder.glob("layer_*.safetensors")):
        return "circuit-tracer"
    if (folder / "params.npz").is_file():
        return "gemma-scope"
    if sparsify.hookpoints(folder):
        return "sparsify-root"
    return None


def read_foreign(folder: str | Path, *, fmt: str | None = None, **options: Any) -> Plain:
    """Read a folder in a foreign format (``fmt``, or the one :func:`detect_format` finds)
    into a :class:`Plain` record; ``SAE.from_plain`` builds the SAE (the detection hook of
    ``SAE.from_pretrained``). ``options`` go to the format's reader (``hook_point``,
    ``rmsnorm_gain`` for sparsify; ``norm_scaling_factor`` for SAELens)."""
    folder = Path(folder)
    found = fmt or detect_format(folder)
    if found == "saelens":
        return saelens.read(folder, **_pick(options, "norm_scaling_factor"))
    if found == "llamascopium":
        return llamascopium.read(folder)
    if found == "sparsify":
        return sparsify.read(folder, **_pick(options, "hook_point", "rmsnorm_gain"))
    convert = f"llamascope convert {folder} --to release OUT"
    if found == "release":
        raise UnsupportedFormatError(f"{folder} is in this SDK's release layout, not a foreign format",
                                     hint=f"load it with SAE.from_folder({str(folder)!r})")
    if found == "sparsify-root":
        points = sparsify.hookpoints(folder)
        raise UnsupportedFormatError(
            f"{folder} is a sparsify checkpoint with {len(points)} hookpoint folders "
            f"({', '.join(points[:4])}{', ...' if len(points) > 4 else ''}); one SAE is one of them",
            hint=f"load {folder / points[0]}, or `llamascope convert {folder / points[0]} --to release OUT`")
    if found == "circuit-tracer":
        raise UnsupportedFormatError(
            f"{folder} is a circuit-tracer transcoder set (config.yaml + layer_L.safetensors); "
            "llamascope-sdk writes this format but does not read it back",
            hint="load the Llama Scope transcoders it came from (e.g. SAE.from_pretrained('L12TC-8x'))")
    if found == "gemma-scope":
        raise UnsupportedFormatError(
            f"{folder} holds a Gemma Scope params.npz, which llamascope-sdk does not read",
            hint="convert it with SAELens to cfg.json + sae_weights.safetensors, then "
                 f"`{convert}`")
    what = ", ".join(sorted(p.name for p in folder.iterdir())[:8]) if folder.is_dir() else "nothing"
    raise SaeNotFoundError(
        f"{folder} is not a checkpoint folder this SDK can read (found: {what}); expected the "
        "Llama Scope release layout (hyperparams.json + checkpoints/final.safetensors), SAELens "
        "(cfg.json + sae_weights.safetensors), Llamascopium (config.json + sae_weights.safetensors) "
        "or sparsify (cfg.json + sae.safetensors)",
        hint=f"a supported foreign folder converts with `{convert}`")


def _pick(options: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in names and v is not None}


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
