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

:func:`detect_format` names what a folder holds; :func:`load_foreign` imports the formats that
can be imported and otherwise raises an error naming the format found and the command that
converts it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamascope_sdk.errors import SaeNotFoundError

from . import circuit_tracer, llamascopium, saelens, sparsify
from ._build import UnsupportedFormatError, resolve_source

IMPORTABLE = ("release", "saelens", "llamascopium", "sparsify")
EXPORTABLE = ("release", "saelens", "llamascopium", "circuit-tracer")

__all__ = ["EXPORTABLE", "IMPORTABLE", "UnsupportedFormatError", "detect_format", "load_foreign",
           "resolve_source"]


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


def load_foreign(folder: str | Path, *, fmt: str | None = None, device: Any = None, dtype: Any = None,
                 gate: str = "reference", **options: Any) -> Any:
    """Import a folder in a foreign format into an SAE (the detection hook of
    ``SAE.from_pretrained``). ``options`` go to the format's reader (``hook_point``,
    ``rmsnorm_gain`` for sparsify; ``norm_scaling_factor`` for SAELens)."""
    from llamascope_sdk.sae import SAE

    folder = Path(folder)
    found = fmt or detect_format(folder)
    kw: dict[str, Any] = {"device": device, "dtype": dtype, "gate": gate}
    if found == "release":
        return SAE.from_folder(folder, **kw)
    if found == "saelens":
        return saelens.load(folder, **_pick(options, "norm_scaling_factor"), **kw)
    if found == "llamascopium":
        return llamascopium.load(folder, **kw)
    if found == "sparsify":
        return sparsify.load(folder, **_pick(options, "hook_point", "rmsnorm_gain"), **kw)
    convert = f"llamascope convert {folder} --to release OUT"
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
