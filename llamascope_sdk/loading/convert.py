"""One entry point for format conversion: ``convert(src, to, out)``.

Sources are anything :meth:`SAE.from_pretrained` accepts (it enters through
:func:`llamascope_sdk.loading.locate.locate`: a Llama Scope name, ``"demo"``, a local folder or a Hub
``org/repo[:subfolder]`` in the release layout, SAELens, Llamascopium or sparsify), or an SAE
object. For ``--to circuit-tracer``
the source is a set of transcoders: ``LXTC-8x`` / ``LXTC-32x`` (all 32 layers of one width),
a comma-separated list, or a list/tuple.

Targets: ``release`` (this SDK's lossless layout), ``saelens``, ``llamascopium``,
``circuit-tracer``. Each writer is exact; the mappings are in ``llamascope_sdk.loading.formats.*``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llamascope_sdk.base.atomic import check_replaceable
from llamascope_sdk.base.dtypes import parse_dtype
from llamascope_sdk.loading.formats import (
    EXPORTABLE,
    UnsupportedFormatError,
    circuit_tracer,
    llamascopium,
    replaceable_sae_folder,
    saelens,
)
from llamascope_sdk.loading.registry import list_saes
from llamascope_sdk.loading.sae import SAE

_SET = re.compile(r"^LX(TC)-(8x|32x|32k|128k|131k)$", re.IGNORECASE)


def load(src: Any, *, fmt: str | None = None, revision: str | None = None, token: Any = None,
         **options: Any) -> SAE:
    """An SAE object as it is; anything else through the front door (``SAE.from_pretrained``)."""
    if isinstance(src, SAE):
        return src
    return SAE.from_pretrained(src, fmt=fmt, revision=revision, token=token, **options)


def transcoder_set(src: Any) -> list[Any]:
    """The members of a transcoder set: SAEs as they are; names as lazy loaders."""
    if isinstance(src, (list, tuple)):
        items: Sequence[Any] = src
    else:
        text = os.fspath(src)
        m = _SET.match(text.strip())
        if m:
            items = [r.name for r in list_saes(position="TC", width=m.group(2))]
        else:
            items = [s.strip() for s in text.split(",") if s.strip()]
    return [s if not isinstance(s, (str, os.PathLike)) else _lazy(s) for s in items]


def _lazy(src: Any) -> Callable[[], Any]:
    return lambda: load(src)


def convert(src: Any, to: str, out: str | os.PathLike[str], *, fmt: str | None = None,
            revision: str | None = None, token: Any = None, dtype: Any = None,
            hub_repo: str | None = None, **options: Any) -> Path:
    """Convert ``src`` to format ``to`` in folder ``out``; returns the folder written.

    Args:
        src: see the module docstring.
        to: ``release``, ``saelens``, ``llamascopium`` or ``circuit-tracer``.
        out: the folder to write: new, empty, or an SAE folder this SDK wrote (replaced
            whole, atomically); anything else is refused before the source is read.
        fmt: the source format when detection should be skipped.
        revision, token: for Hub sources.
        dtype: for ``circuit-tracer``, the dtype of the written tensors (default float32).
        hub_repo: for ``circuit-tracer``, the repository the set will be uploaded to
            (``config.yaml`` then names ``hf://`` paths).
        options: reader options (``hook_point``, ``rmsnorm_gain``, ``norm_scaling_factor``).

    Raises:
        UnsupportedFormatError: the source or target cannot express the checkpoint exactly.
        FolderNotOwnedError: ``out`` holds files the SDK did not write.
    """
    target = to.lower().replace("_", "-")
    if target not in EXPORTABLE:
        raise UnsupportedFormatError(f"unknown target format {to!r}: allowed are {', '.join(EXPORTABLE)}")
    check_replaceable(out, replaceable_sae_folder)  # before anything is loaded or downloaded
    if target == "circuit-tracer":
        return circuit_tracer.export(transcoder_set(src), out, hub_repo=hub_repo,
                                     dtype=parse_dtype(dtype) if dtype else None)
    sae = load(src, fmt=fmt, revision=revision, token=token, **options)
    if target == "release":
        return Path(sae.save_pretrained(Path(out)))
    if target == "saelens":
        return saelens.export(sae, out)
    return llamascopium.export(sae, out)


__all__ = ["convert", "load", "transcoder_set"]
