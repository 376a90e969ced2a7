"""A request's ``steering`` and ``readout`` entries (the steering spec's,
:mod:`llamascope_sdk.steering.spec`) turned into row edits and readouts, with the words that say
what the edits do.

Modes that build from decoder rows alone (``add``, see the spec's table) come from
:meth:`SaePool.steer_edit` (the SAE is not loaded for them); the others need the SAE's encoder,
so the SAE is taken from the pool and held (never evicted) until the request ends, as are the
SAEs of feature conditions and readouts. Descriptions are
:func:`~llamascope_sdk.steering.generation.describe`'s lines, the CLI caption, followed by the
condition when there is one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from llamascope_sdk.base.errors import FieldError, SaeNotFoundError, UnknownSaeError
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.demo import is_demo
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.serve.errors import HttpError, http_error
from llamascope_sdk.steering.conditions import Condition, DirectionCondition, FeatureCondition
from llamascope_sdk.steering.generation import describe
from llamascope_sdk.steering.interventions import Intervention
from llamascope_sdk.steering.pool import SaePool
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


def check_name(name: str, param: str, *, served: Collection[str], allow_local: bool) -> None:
    """Refuse a local folder unless it was named at startup or ``allow_local``; Llama Scope
    names and the demo are always allowed."""
    if is_demo(name) or name in served:
        return
    if Path(name).expanduser().exists() and not allow_local:
        raise HttpError(404, f"{param}.sae: {name!r} is not served (local folders must be named "
                             "with --sae at startup, or the server started with "
                             "--allow-local-saes)", f"{param}.sae")


def build(specs: list[SteeringEntry], pool: SaePool, model: Any, *,
          served: Collection[str] = (), allow_local: bool = False,
          readouts: list[ReadoutEntry] | None = None) -> Steering:
    """Row edits for ``specs`` and the readouts of ``readouts`` (loading SAEs as needed).
    Raises :class:`HttpError` naming the field; on an error every SAE already held is
    released."""
    out = Steering(pool=pool)
    try:
        for spec in specs:
            edit, text = _one(spec, pool, out, model, served, allow_local)
            out.edits += as_row_edits(model, [edit])
            out.applied.append(f"{spec.sae}: {text}")
        for r in readouts or []:
            out.readouts.append(_readout(r, out, model, served, allow_local))
    except BaseException:
        out.release()
        raise
    return out


def _step(fn: Callable[[], T], param: str) -> T:
    """``fn()``; an SDK error becomes the HTTP answer about field ``param`` (an index out of
    range about its ``feature`` list, an unknown SAE about its ``sae``)."""
    try:
        return fn()
    except HttpError:
        raise
    except FieldError as exc:
        raise http_error(exc, exc.field) from None
    except Exception as exc:
        base = param.rsplit(".", 1)[0]
        if isinstance(exc, IndexError):
            field = f"{base}.feature" if not base.startswith("readout") else param
        elif isinstance(exc, UnknownSaeError) or (isinstance(exc, (KeyError, FileNotFoundError))
                                                   and not isinstance(exc, SaeNotFoundError)):
            field = f"{base}.sae"
        else:
            field = param
        raise http_error(exc, field) from None


def _held(name: str, param: str, out: Steering, model: Any, served: Collection[str],
          allow_local: bool) -> SAE:
    """The SAE ``name`` from the pool, held until the request ends, checked against the model."""
    check_name(name, param, served=served, allow_local=allow_local)
    assert out.pool is not None
    sae = _step(lambda: out.pool.acquire(name), f"{param}.sae")  # type: ignore[union-attr]
    out.held.append(sae)
    _step(lambda: check_compatible(model, sae), f"{param}.sae")
    return sae


def _readout(r: ReadoutEntry, out: Steering, model: Any, served: Collection[str],
             allow_local: bool) -> Readout:
    sae = _held(r.sae, r.param, out, model, served, allow_local)
    feats = list(r.features) if r.features is not None else None

    def make() -> Readout:
        return Readout(sae, feats, top_k=r.top_k, name=r.sae)

    return _step(make, f"{r.param}.features" if feats is not None else f"{r.param}.top_k")


def _condition(spec: SteeringEntry, out: Steering, model: Any, served: Collection[str],
               allow_local: bool) -> Condition | None:
    w, param = spec.when, f"{spec.param}.when"
    if w is None:
        return None
    if w.direction is not None:
        vector, hook_point = torch.tensor(w.direction), str(w.hook_point)
        return _step(lambda: DirectionCondition(vector, hook_point, w.above, latch=w.latch),
                     f"{param}.direction")
    assert w.sae is not None and w.feature is not None
    sae = _held(w.sae, param, out, model, served, allow_local)
    return _step(lambda: FeatureCondition(sae, w.feature, w.above, latch=w.latch),  # type: ignore[arg-type]
                 f"{param}.feature")


def _one(spec: SteeringEntry, pool: SaePool, out: Steering, model: Any, served: Collection[str],
         allow_local: bool) -> tuple[RowEdit | Intervention, str]:
    """One entry's edit and its caption; a mode that reads rows only (``add``) does not load
    the SAE; the others hold it. A bad condition or edit is a 400 about its field."""
    check_name(spec.sae, spec.param, served=served, allow_local=allow_local)
    when = _condition(spec, out, model, served, allow_local)
    if spec.mode == "ablate" and spec.mean:
        sae = _held(spec.sae, spec.param, out, model, served, allow_local)
        if sae.stats is None:
            raise HttpError(400, f"{spec.param}.mean: {sae.name} has no feature statistics for "
                                 "a mean ablation; ablate to zero instead", f"{spec.param}.mean")
    if spec.row.rows_only:
        _step(lambda: pool.key(spec.sae), f"{spec.param}.sae")
        edit, text = _step(lambda: pool.steer_edit(
            spec.sae, list(spec.features), spec.value, relative=spec.relative,  # type: ignore[arg-type]
            positions=spec.positions, when=when), _value_field(spec))  # type: ignore[arg-type]
        return _describe(edit, text, when)
    sae = _held(spec.sae, spec.param, out, model, served, allow_local)
    iv = _step(lambda: spec.intervention(sae, when), _value_field(spec))
    return _describe(iv, describe(iv), when)


def _value_field(spec: SteeringEntry) -> str:
    """The field a failure to build the edit is about: an index out of range is about
    ``feature`` (mapped in :func:`_step`), statistics about ``relative``, else ``value``."""
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
        for k, (r, vals) in enumerate(zip(self.readouts, read, strict=True)):
            pct = self.percentiles[k]
            p = pct(vals.features, vals.values) if pct is not None else None
            rows = []
            for t, tok in enumerate(ids):
                row: dict[str, Any] = {"position": self.position + t, "token_id": tok,
                                       "token": self.decode([tok]),
                                       "values": [round(float(v), 6) for v in vals.values[t]]}
                if r.top_k is not None:
                    row["features"] = [int(f) for f in vals.features[t]]
                if p is not None:
                    row["percentiles"] = [None if v != v else round(float(v), 3) for v in p[t]]
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
