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

from pathlib import Path
from typing import Any

from llamascope_sdk.errors import SaeNotFoundError

from . import circuit_tracer, llamascopium, saelens, sparsify
from ._build import Exportable, Plain, UnsupportedFormatError, collapse_threshold, resolve_source

IMPORTABLE = ("release", "saelens", "llamascopium", "sparsify")
EXPORTABLE = ("release", "saelens", "llamascopium", "circuit-tracer")

__all__ = ["EXPORTABLE", "IMPORTABLE", "Exportable", "Plain", "UnsupportedFormatError",
           "collapse_threshold", "detect_format", "read_foreign", "resolve_source"]


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
