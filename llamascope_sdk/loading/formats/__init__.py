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
listing's), once per load (:mod:`llamascope_sdk.loading.locate` calls it);
:func:`check_importable` refuses the others in one line naming the format found and what to do;
:func:`files_to_read` says which files an import reads (all a Hub folder downloads);
:func:`read_foreign` reads a foreign folder into a :class:`Plain` record (which
``SAE.from_plain`` builds an SAE from). This
package never imports :mod:`llamascope_sdk.loading.sae`: the exporters read an SAE through the
:class:`Exportable` protocol.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

from llamascope_sdk.base.errors import SaeNotFoundError
from llamascope_sdk.loading.formats import circuit_tracer, llamascopium, saelens, sparsify
from llamascope_sdk.loading.formats._build import (
    Exportable,
    Plain,
    UnsupportedFormatError,
    collapse_threshold,
)
from llamascope_sdk.loading.formats.layouts import (
    SAE_LAYOUT_FILES,
    SDK_MARK,
    detect,
    detect_format,
    folder_files,
    hookpoints,
    replaceable_sae_folder,
)
from llamascope_sdk.loading.release import CHECKPOINT, RELEASE_OPTIONAL

IMPORTABLE = ("release", "saelens", "llamascopium", "sparsify")
EXPORTABLE = ("release", "saelens", "llamascopium", "circuit-tracer")

__all__ = ["EXPORTABLE", "IMPORTABLE", "Exportable", "Plain", "UnsupportedFormatError",
           "check_importable", "collapse_threshold", "detect", "detect_format", "files_to_read",
           "folder_files", "read_foreign", "replaceable_sae_folder", "hookpoints", "SAE_LAYOUT_FILES",
           "SDK_MARK", "circuit_tracer", "llamascopium", "saelens", "sparsify"]

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


