"""A request's ``steering`` and ``readout`` entries (the steering spec's,
:mod:`llamascope_sdk.steering.spec`) turned into row edits and readouts, with the words that say
what the edits do.

Modes that build from decoder rows alone (``add``, see the spec's table) come from
:meth:`SaePool.steer_edit` (the SAE is not loaded for them); the others need the SAE's encoder,
so the SAE is taken from the pool and held (never evicted) until the request ends, as are the
SAEs of feature conditions and readouts. Every SAE name (an edit's, a condition's, a readout's)
is checked against the operator's allow-list
(:class:`~llamascope_sdk.serve.security.SaeAllowList`) before it is looked up, and an SAE that
cannot be had gets one 404 that names no host detail; SAE memory that this request's SAEs can
never fit is a 400, memory held by other requests a 429. Descriptions are
:func:`~llamascope_sdk.steering.generation.describe`'s lines, the CLI caption, followed by the
condition when there is one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from llamascope_sdk.base.errors import (
    FieldError,
    HookpointNotFoundError,
    PoolBusyError,
    SaeBudgetError,
    SaeNotFoundError,
    UnknownSaeError,
)
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.serve.errors import HttpError, busy, http_error, log
from llamascope_sdk.serve.security import SaeAllowList
from llamascope_sdk.steering.conditions import Condition, DirectionCondition, FeatureCondition
from llamascope_sdk.steering.generation import describe
from llamascope_sdk.steering.interventions import Intervention
from llamascope_sdk.steering.pool import SaePool, sae_bytes
from llamascope_sdk.steering.readout import Readout, ReadoutValues
from llamascope_sdk.steering.row_edits import RowEdit, as_row_edits
from llamascope_sdk.steering.spec import ReadoutEntry, SteeringEntry

T = TypeVar("T")


@dataclass
class Steering:
    """The edits of one request, their descriptions, and the SAEs held for them."""

    edits: list[RowEdit] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    held: list[SAE] = field(default_factory=list)
    pool: SaePool | None = None
    readouts: list[Readout] = field(default_factory=list)

    def release(self) -> None:
        """Let the pool evict the held SAEs again (idempotent)."""
        if self.pool is not None:
            for s in self.held:
                self.pool.release(s)
        self.held = []


def build(specs: list[SteeringEntry], pool: SaePool, model: Any, *, names: SaeAllowList,
          readouts: list[ReadoutEntry] | None = None) -> Steering:
    """Row edits for ``specs`` and the readouts of ``readouts`` (loading SAEs as needed).
    Raises :class:`HttpError` naming the field; on an error every SAE already held is
    released. Each SAE name is checked against ``names`` before anything is looked up."""
    out = Steering(pool=pool)
    try:
        for spec in specs:
            edit, text = _one(spec, pool, out, model, names)
            out.edits += _placed(model, edit, spec.param)
            out.applied.append(f"{spec.sae}: {text}")
        for r in readouts or []:
            out.readouts.append(_readout(r, out, model, names))
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


def edit_error(exc: BaseException, name: str, param: str, out: Steering,
               other: str | None = None) -> HttpError:
    """The answer for an error raised while getting SAE ``name`` (field ``param``, an entry's
    ``sae``) or building from it, by the error's class: the SAE memory (:func:`budget_error`),
    an SAE gone meanwhile (:func:`not_available`), else as :func:`_mapped` about ``other``
    (default ``param``)."""
    if isinstance(exc, SaeBudgetError):
        assert out.pool is not None
        return budget_error(exc, param, out.pool, out.held)
    if isinstance(exc, (SaeNotFoundError, UnknownSaeError, OSError)):  # files gone meanwhile
        return not_available(exc, name, param)
    return _mapped(exc, other or param)


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


def _admit(name: str, param: str, out: Steering, names: SaeAllowList) -> None:
    """Refuse an SAE name the operator did not allow, then make it available (field
    ``param``, an entry's ``sae``); before any lookup."""
    assert out.pool is not None
    names.check(name, param)
    fetch(out.pool, name, param)


def _placed(model: Any, edit: RowEdit | Intervention, param: str) -> list[RowEdit]:
    """The edit placed at its sites (its SAE checked against the model)."""
    return _step(lambda: as_row_edits(model, [edit]), param)


def _step(fn: Callable[[], T], param: str) -> T:
    """``fn()``; an SDK error becomes the HTTP answer about field ``param`` (:func:`_mapped`)."""
    try:
        return fn()
    except Exception as exc:
        raise _mapped(exc, param) from None


def _mapped(exc: BaseException, param: str) -> HttpError:
    """The answer for an error about field ``param``, by the error's class: an index out of
    range is about the entry's ``feature``, an unknown SAE about its ``sae``; a
    :class:`FieldError` names its own field inside the entry."""
    entry = param.split(".")[0]
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, FieldError):
        return http_error(exc, entry)  # its field, inside the entry
    if isinstance(exc, IndexError) and not entry.startswith("readout"):
        where = f"{entry}.feature" if ".when" not in param else f"{entry}.when.feature"
    elif isinstance(exc, UnknownSaeError) or (
            isinstance(exc, (KeyError, FileNotFoundError))
            and not isinstance(exc, (SaeNotFoundError, HookpointNotFoundError))):
        where = f"{entry}.sae"
    else:
        where = param
    return http_error(exc, where)


def _held(name: str, param: str, out: Steering, model: Any, names: SaeAllowList) -> SAE:
    """The allowed SAE ``name`` from the pool, held until the request ends, checked against the
    model (``param``: the entry, or its ``when``)."""
    where = f"{param}.sae"
    _admit(name, where, out, names)
    assert out.pool is not None
    try:
        sae = out.pool.acquire(name)
    except Exception as exc:
        raise edit_error(exc, name, where, out) from None
    out.held.append(sae)
    _step(lambda: check_compatible(model, sae), where)
    return sae


def _readout(r: ReadoutEntry, out: Steering, model: Any, names: SaeAllowList) -> Readout:
    sae = _held(r.sae, r.param, out, model, names)
    feats = list(r.features) if r.features is not None else None

    def make() -> Readout:
        return Readout(sae, feats, top_k=r.top_k, name=r.sae)

    return _step(make, f"{r.param}.features" if feats is not None else f"{r.param}.top_k")


def _condition(spec: SteeringEntry, out: Steering, model: Any,
               names: SaeAllowList) -> Condition | None:
    w, param = spec.when, f"{spec.param}.when"
    if w is None:
        return None
    cond: Condition
    if w.direction is not None:
        vector, hook_point = torch.tensor(w.direction), str(w.hook_point)
        cond = _step(lambda: DirectionCondition(vector, hook_point, w.above, latch=w.latch),
                     f"{param}.hook_point")
    else:
        assert w.sae is not None and w.feature is not None
        sae = _held(w.sae, param, out, model, names)
        cond = _step(lambda: FeatureCondition(sae, w.feature, w.above, latch=w.latch),  # type: ignore[arg-type]
                     f"{param}.feature")
    _step(lambda: cond.check_model(model), param)
    return cond


def _one(spec: SteeringEntry, pool: SaePool, out: Steering, model: Any,
         names: SaeAllowList) -> tuple[RowEdit | Intervention, str]:
    """One entry's edit and its caption; a mode that reads rows only (``add``) does not load
    the SAE; the others hold it. A bad condition or edit is a 400 about its field."""
    where = f"{spec.param}.sae"
    names.check(spec.sae, where)  # the edit's own SAE first, then its condition's
    when = _condition(spec, out, model, names)
    if spec.mode == "ablate" and spec.mean:
        sae = _held(spec.sae, spec.param, out, model, names)
        if sae.stats is None:
            raise HttpError(400, f"{spec.param}.mean: {sae.name} has no feature statistics for "
                                 "a mean ablation; ablate to zero instead", f"{spec.param}.mean")
    if spec.row.rows_only:
        _admit(spec.sae, where, out, names)
        try:
            edit, text = pool.steer_edit(
                spec.sae, list(spec.features), spec.value, relative=spec.relative,  # type: ignore[arg-type]
                positions=spec.positions, when=when)  # type: ignore[arg-type]
        except Exception as exc:
            raise edit_error(exc, spec.sae, where, out, _value_field(spec)) from None
        return _describe(edit, text, when)
    sae = _held(spec.sae, spec.param, out, model, names)
    iv = _step(lambda: spec.intervention(sae, when), _value_field(spec))
    return _describe(iv, describe(iv), when)


def _value_field(spec: SteeringEntry) -> str:
    """The field a failure to build the edit is about: an index out of range is about
    ``feature`` (mapped in :func:`_mapped`), statistics about ``relative``, else ``value``."""
    return f"{spec.param}.relative" if spec.relative else f"{spec.param}.value"


def _describe(edit: RowEdit | Intervention, text: str,
              when: Condition | None) -> tuple[RowEdit | Intervention, str]:
    return edit, text if when is None else f"{text}, {when.describe()}"


class ReadoutLog:
    """A request's readouts as JSON, position by position, as the generator's events bring
    them (:class:`~llamascope_sdk.steering.batch_generation.Token`): the prompt first, then
    each generated token. ``percentiles`` gives, per readout, the function that turns (features,
    values) into percentiles among the mined activations, or None where no store has its SAE.
    """

    def __init__(self, readouts: list[Readout], decode: Callable[[list[int]], str],
                 percentiles: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]
                 ) -> None:
        self.readouts, self.decode, self.percentiles = readouts, decode, percentiles
        self.tokens: list[list[dict[str, Any]]] = [[] for _ in readouts]
        self.position = 0

    def add(self, read: list[ReadoutValues] | None, ids: list[int] | None) -> list[dict[str, Any]]:
        """Log one event's readouts; returns them as JSON (one object per readout, holding the
        new positions only), empty when the event read nothing."""
        if not read or not ids:
            return []
        new = []
        texts = [self.decode([tok]) for tok in ids]
        for k, (r, vals) in enumerate(zip(self.readouts, read, strict=True)):
            pct = self.percentiles[k]
            values = vals.values.tolist()  # one conversion, not one per value
            feats = vals.features.tolist() if r.top_k is not None else None
            pcts = pct(vals.features, vals.values).tolist() if pct is not None else None
            rows = []
            for t, tok in enumerate(ids):
                row: dict[str, Any] = {"position": self.position + t, "token_id": tok,
                                       "token": texts[t], "values": values[t]}
                if feats is not None:
                    row["features"] = feats[t]
                if pcts is not None:
                    row["percentiles"] = [None if v != v else round(v, 3) for v in pcts[t]]
                rows.append(row)
            self.tokens[k] += rows
            new.append(self._head(k) | {"tokens": rows})
        self.position += len(ids)
        return new

    def _head(self, k: int) -> dict[str, Any]:
        r = self.readouts[k]
        head: dict[str, Any] = {"sae": r.name}
        if r.idx is not None:
            head["features"] = [int(i) for i in r.idx.tolist()]
        else:
            head["top_k"] = r.top_k
        return head

    def json(self) -> list[dict[str, Any]]:
        """Every position logged so far, one object per readout."""
        return [self._head(k) | {"tokens": rows} for k, rows in enumerate(self.tokens)]
