"""A request's ``steering`` list turned into row edits, with the words that say what they do.

``add`` edits come from :meth:`SaePool.steer_edit` (a steer from decoder rows alone when the SAE
is not loaded); ``clamp``, ``scale`` and ``ablate`` need the SAE's encoder, so the SAE is taken
from the pool and held (never evicted) until the request ends. Descriptions are
:func:`~llamascope_sdk.steering.generation.describe`'s lines, the CLI caption.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamascope_sdk.loading.demo import is_demo
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.serve.errors import HttpError, http_error
from llamascope_sdk.serve.payloads import EditSpec
from llamascope_sdk.steering.generation import describe
from llamascope_sdk.steering.interventions import Ablate, Clamp, Intervention, Scale
from llamascope_sdk.steering.pool import SaePool
from llamascope_sdk.steering.row_edits import RowEdit, as_row_edits


@dataclass
class Steering:
    """The edits of one request, their descriptions, and the SAEs held for them."""

    edits: list[RowEdit] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    held: list[SAE] = field(default_factory=list)
    pool: SaePool | None = None

    def release(self) -> None:
        """Let the pool evict the held SAEs again (idempotent)."""
        if self.pool is not None:
            for s in self.held:
                self.pool.release(s)
        self.held = []


def check_name(name: str, param: str, *, served: Collection[str], allow_local: bool) -> None:
    """Refuse a local folder unless it was named at startup or ``allow_local``; Llama Scope
    names and the demo are always allowed."""
    if is_demo(name) or name in served:
        return
    if Path(name).expanduser().exists() and not allow_local:
        raise HttpError(404, f"{param}.sae: {name!r} is not served (local folders must be named "
                             "with --sae at startup, or the server started with "
                             "--allow-local-saes)", f"{param}.sae")


def build(specs: list[EditSpec], pool: SaePool, model: Any, *, served: Collection[str] = (),
          allow_local: bool = False) -> Steering:
    """Row edits for ``specs`` (loading SAEs as needed). Raises :class:`HttpError` naming the
    edit; on an error every SAE already held is released."""
    out = Steering(pool=pool)
    try:
        for spec in specs:
            check_name(spec.sae, spec.param, served=served, allow_local=allow_local)
            try:
                edit, text = _one(spec, pool, out)
                out.edits += as_row_edits(model, [edit])
            except HttpError:
                raise
            except Exception as exc:
                param = (f"{spec.param}.feature" if isinstance(exc, IndexError) or
                         "feature" in str(exc) else f"{spec.param}.sae"
                         if isinstance(exc, (KeyError, FileNotFoundError)) else spec.param)
                raise http_error(exc, param) from None
            out.applied.append(f"{spec.sae}: {text}")
    except BaseException:
        out.release()
        raise
    return out


def _one(spec: EditSpec, pool: SaePool, out: Steering) -> tuple[RowEdit | Intervention, str]:
    if spec.mode == "add":
        assert spec.value is not None
        return pool.steer_edit(spec.sae, spec.features, spec.value, relative=spec.relative,
                               positions=spec.positions)  # type: ignore[arg-type]  # checked
    sae = pool.acquire(spec.sae)
    out.held.append(sae)
    iv: Intervention
    if spec.mode == "clamp":
        assert spec.value is not None
        iv = Clamp(sae, spec.features, spec.value, positions=spec.positions)  # type: ignore[arg-type]
    elif spec.mode == "scale":
        assert spec.value is not None
        iv = Scale(sae, spec.features, spec.value, positions=spec.positions)  # type: ignore[arg-type]
    else:
        if spec.mean and sae.stats is None:
            raise HttpError(400, f"{spec.param}.mean: {sae.name} has no feature statistics for "
                                 "a mean ablation; ablate to zero instead", f"{spec.param}.mean")
        iv = Ablate(sae, spec.features, mode="mean" if spec.mean else "zero",
                    positions=spec.positions)  # type: ignore[arg-type]
    return iv, describe(iv)
