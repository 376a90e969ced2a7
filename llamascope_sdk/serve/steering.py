"""A request's ``steering`` list turned into row edits, with the words that say what they do.

``add`` edits come from :meth:`SaePool.steer_edit` (a steer from decoder rows alone when the SAE
is not loaded); ``clamp``, ``scale`` and ``ablate`` need the SAE's encoder, so the SAE is taken
from the pool and held (never evicted) until the request ends. A name is checked against the
operator's allow-list (:class:`~llamascope_sdk.serve.security.SaeAllowList`) before it is
looked up, and an SAE that cannot be had gets one 404 that names no host detail. Descriptions are
:func:`~llamascope_sdk.steering.generation.describe`'s lines, the CLI caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llamascope_sdk.base.errors import (
    FeatureIndexError,
    IncompatibleModelError,
    PoolBusyError,
    SaeBudgetError,
    SaeNotFoundError,
    UnknownSaeError,
)
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.serve.errors import HttpError, busy, http_error, log
from llamascope_sdk.serve.payloads import EditSpec
from llamascope_sdk.serve.security import SaeAllowList
from llamascope_sdk.steering.generation import describe
from llamascope_sdk.steering.interventions import Ablate, Clamp, Intervention, Scale
from llamascope_sdk.steering.pool import SaePool, sae_bytes
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


def build(specs: list[EditSpec], pool: SaePool, model: Any, *, names: SaeAllowList) -> Steering:
    """Row edits for ``specs`` (loading SAEs as needed). Raises :class:`HttpError` naming the
    edit's field; on an error every SAE already held is released. Each name is checked
    against ``names`` before anything is looked up."""
    out = Steering(pool=pool)
    try:
        for spec in specs:
            names.check(spec.sae, f"{spec.param}.sae")
            fetch(pool, spec.sae, f"{spec.param}.sae")
            try:
                edit, text = _one(spec, pool, out)
                out.edits += as_row_edits(model, [edit])
            except Exception as exc:
                raise edit_error(exc, spec, pool, out) from None
            out.applied.append(f"{spec.sae}: {text}")
    except BaseException:
        out.release()
        raise
    return out


def fetch(pool: SaePool, name: str, param: str) -> None:
    """Make the allowed SAE ``name`` available (resolved, downloaded if it must be): any
    failure is the same 404, with the detail (cache paths, the Hub's answer) in the log."""
    try:
        pool.fetch(name)
    except Exception as exc:  # noqa: BLE001  (every cause gets the same answer)
        raise not_available(exc, name, param) from None


def not_available(exc: BaseException, name: str, param: str) -> HttpError:
    log.warning("%s: SAE %r is not available: %s: %s", param, name, type(exc).__name__, exc)
    return HttpError(404, f"{param}: SAE {_shown(name)} is not available on this server (the "
                          "server log says why)", param)


def edit_error(exc: BaseException, spec: EditSpec, pool: SaePool, out: Steering) -> HttpError:
    """The answer for an error raised while building edit ``spec``, by the error's class."""
    if isinstance(exc, SaeBudgetError):
        return budget_error(exc, f"{spec.param}.sae", pool, out.held)
    if isinstance(exc, (SaeNotFoundError, UnknownSaeError, OSError)):  # files gone meanwhile
        return not_available(exc, spec.sae, f"{spec.param}.sae")
    if isinstance(exc, FeatureIndexError):
        return http_error(exc, f"{spec.param}.feature")
    if isinstance(exc, IncompatibleModelError):
        return http_error(exc, f"{spec.param}.sae")
    return http_error(exc, spec.param)


def budget_error(exc: SaeBudgetError, param: str, pool: SaePool, held: list[SAE]) -> HttpError:
    """429 while other requests hold the SAE memory; 400 naming the limit when this request's
    own SAEs can never fit it, however long the client waits."""
    need = getattr(exc, "need", None)
    own = sum(sae_bytes(s) for s in held)
    if isinstance(exc, PoolBusyError) and need is not None and own + need <= pool.budget:
        return busy(f"{param}: the SAE memory is in use by other requests; try again later")
    total = f"{(own + need) / 1e6:.1f} MB" if need is not None else "more"
    return HttpError(400, f"{param}: this request's SAEs need {total} of SAE memory together, "
                          f"more than this server's budget of {pool.budget / 1e6:.1f} MB "
                          "(--sae-memory); send fewer or smaller SAEs per request", param)


def _shown(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:80] + "...")


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
