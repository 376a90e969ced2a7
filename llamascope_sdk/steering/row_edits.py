"""Row edits: every row of a batch carries its own feature edits, in one batched forward.

:func:`row_hooks` builds the :func:`~llamascope_sdk.core.hooks.hooked` functions for one forward of a
batch whose rows each have their own edits (or none). A row's edits change only that row, with
exactly the math of :func:`~llamascope_sdk.steering.attachment.attach` for the same interventions on that
row alone (:func:`~llamascope_sdk.steering.interventions.edit_delta`, summed per site in the order attach
sums them, then added to the clean activation); rows without edits are not touched.

Positions are per row: ``pos_BT`` holds each token's position inside its own sequence (negative
at left padding), ``prompt_lens`` each row's prompt length, so ``"prompt"``, ``"generated"``,
slices and lists mean for a row what they mean for that row run alone. Special tokens (``keep_BT``
False) and padding are never edited, as in attach.

An edit is an :class:`InterventionEdit` (a Steer/Clamp/Scale/Ablate on a loaded SAE) or a
:class:`VectorEdit` (a fixed vector added at a site: a steer whose vector was computed from
decoder rows alone, see :class:`~llamascope_sdk.steering.pool.SaePool`). Either may carry a
condition (``when``, :mod:`~llamascope_sdk.steering.conditions`): it then applies only where
that row's condition holds, read in the same forward (latched conditions keep their state in
the row's :class:`RowState`). A row may also carry readouts
(:class:`~llamascope_sdk.steering.readout.Readout`), read at its real positions of each
forward into its :class:`RowState`. Readers run before the edits of their site.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llamascope_sdk.base.errors import IncompatibleModelError
from llamascope_sdk.core.hooks import SiteFn
from llamascope_sdk.core.sites import Site, hidden_size, module_for
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.steering.conditions import Condition, gate
from llamascope_sdk.steering.interventions import (
    Intervention,
    Positions,
    Steer,
    check_positions,
    edit_delta,
    position_mask,
)
from llamascope_sdk.steering.readout import Readout, ReadoutValues


@dataclass
class InterventionEdit:
    """An intervention on a loaded SAE, placed at that SAE's sites (checked against the model)."""

    iv: Intervention
    site_in: Site
    site_out: Site
    _vector: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model: nn.Module, iv: Intervention) -> InterventionEdit:
        if not isinstance(iv, Intervention):
            raise TypeError(f"edits must be Steer/Clamp/Scale/Ablate, got {type(iv).__name__}")
        site_in, site_out = check_compatible(model, iv.sae)
        return cls(iv, site_in, site_out)

    @property
    def positions(self) -> Positions:
        return self.iv.positions

    @property
    def when(self) -> Condition | None:
        return self.iv.when

    @property
    def group(self) -> int:
        """Edits of one SAE sum together, SAEs in order of first use (as in attach)."""
        return id(self.iv.sae)

    def delta(self, x: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:
        if isinstance(self.iv, Steer):  # the same product edit_delta takes, computed once
            if self._vector is None:
                sae = self.iv.sae
                self._vector = self.iv.coefficients().to(sae.dtype) @ sae.W_dec[self.iv.idx]
            m = m_BT[..., None].to(device=self._vector.device, dtype=self._vector.dtype)
            return m * self._vector
        return edit_delta(self.iv, x, None, m_BT)


@dataclass
class VectorEdit:
    """Add ``vector`` [D] at ``site`` where the position mask is True: ``m * vector``, the same
    operation as a Steer whose ``alpha @ W_dec[idx]`` is ``vector``."""

    vector: torch.Tensor
    site: Site
    positions: Positions = "all"
    group: object = field(default_factory=object)
    when: Condition | None = None

    def __post_init__(self) -> None:
        check_positions(self.positions)
        if self.site.reads_input:
            raise ValueError(f"a vector is added at an output site, not {self.site.hook_point}")
        if self.when is not None:
            self.when.check_before(self.site, "VectorEdit")

    @property
    def site_in(self) -> Site:
        return self.site

    @property
    def site_out(self) -> Site:
        return self.site

    def delta(self, x: torch.Tensor, m_BT: torch.Tensor) -> torch.Tensor:  # noqa: ARG002
        m = m_BT[..., None].to(device=self.vector.device, dtype=self.vector.dtype)
        return m * self.vector


RowEdit = InterventionEdit | VectorEdit


def as_row_edits(model: nn.Module, edits: Sequence[Intervention | RowEdit]) -> list[RowEdit]:
    """Interventions wrapped as :class:`InterventionEdit` (their SAE checked against ``model``);
    ready edits kept as given."""
    out: list[RowEdit] = []
    for e in edits:
        if e.when is not None:
            e.when.check_model(model)
        if isinstance(e, VectorEdit):
            module_for(model, e.site)
            if tuple(e.vector.shape) != (hidden_size(model),):
                raise IncompatibleModelError(
                    f"a steering vector of shape {list(e.vector.shape)} does not fit the model's "
                    f"hidden size {hidden_size(model)} at {e.site.hook_point}")
            out.append(e)
        else:
            out.append(e if isinstance(e, InterventionEdit) else InterventionEdit.of(model, e))
    return out


@dataclass
class RowState:
    """What one row carries from forward to forward: the readouts it asks for and what the
    last forward read for them, and which of its edits' conditions have latched."""

    readouts: Sequence[Readout] = ()
    got: dict[int, ReadoutValues] = field(default_factory=dict)  # readout index -> last forward's
    latched: dict[int, torch.Tensor] = field(default_factory=dict)  # edit index -> bool [1]
    fired: torch.Tensor | None = None  # bool []: a condition held somewhere (None: none)

    @property
    def read(self) -> list[ReadoutValues]:
        """What the last forward read, one entry per readout, in the order of ``readouts``."""
        return [self.got[k] for k in range(len(self.readouts)) if k in self.got]


def row_hooks(edits: Sequence[Sequence[RowEdit]], pos_BT: torch.Tensor,
              prompt_lens: Sequence[int], keep_BT: torch.Tensor,
              states: Sequence[RowState] | None = None) -> dict[Site, list[SiteFn]]:
    """The hook functions for one forward of a batch: row ``b`` gets ``edits[b]``.

    Args:
        edits: one list per row of the forward (empty: the row is left alone).
        pos_BT: [B, T] each token's position in its own sequence (negative at padding).
        prompt_lens: each row's prompt length (for ``"prompt"``/``"generated"``).
        keep_BT: [B, T] False at special tokens and padding (never edited).
        states: per row, its readouts (read into ``state.read`` at the real positions of
            this forward) and its latched conditions (updated); None: no row has either.

    Returns:
        site -> functions, for :func:`~llamascope_sdk.core.hooks.hooked`; empty when no row
        has edits or readouts. At a site, readers (conditions, readouts) run before edits.
    """
    if len(edits) != pos_BT.shape[0] or len(prompt_lens) != pos_BT.shape[0]:
        raise ValueError(f"row_hooks: {len(edits)} edit lists and {len(prompt_lens)} prompt "
                         f"lengths for a batch of {pos_BT.shape[0]} rows")
    states = states if states is not None else [RowState() for _ in edits]
    gates: dict[tuple[int, int], torch.Tensor] = {}  # (row, edit) -> where its condition holds
    readers: dict[Site, list[Callable[[torch.Tensor], None]]] = {}
    # site_out -> row -> [(edit, mask [1, T], edit index)], grouped by SAE in order of first use
    plan: dict[Site, dict[int, list[tuple[RowEdit, torch.Tensor, int]]]] = {}
    tc_layers: set[int] = set()
    # (site, readout key) -> [(row, readout index, readout)]: read together
    reads: dict[tuple[Site, object], list[tuple[int, int, Readout]]] = {}
    for b, row in enumerate(edits):
        groups: dict[tuple[Site, object], list[tuple[int, RowEdit]]] = {}
        for j, e in enumerate(row):
            groups.setdefault((e.site_out, e.group), []).append((j, e))
            if e.when is not None:
                readers.setdefault(e.when.site, []).append(
                    _condition_reader(e.when, b, j, keep_BT, states[b], gates))
        for (site, _), members in groups.items():
            for j, e in members:
                m = position_mask(e.positions, pos_BT[b], prompt_lens[b]) & keep_BT[b]
                plan.setdefault(site, {}).setdefault(b, []).append((e, m[None, :], j))
                if e.site_in.reads_input:
                    tc_layers.add(e.site_in.layer)
        states[b].got = {}
        for k, r in enumerate(states[b].readouts):
            reads.setdefault((r.site, r.key), []).append((b, k, r))
    for (site, _), group in reads.items():
        readers.setdefault(site, []).append(_readout_reader(group, pos_BT, keep_BT, states))
    tc_in: dict[int, torch.Tensor] = {}
    hooks: dict[Site, list[SiteFn]] = {}
    for layer in sorted(tc_layers):
        hooks[Site(layer, "ln2_normalized")] = [_keep_input(tc_in, layer)]
    for site, fns in readers.items():
        hooks.setdefault(site, []).append(_read_all(fns))
    for site, rows in plan.items():
        hooks.setdefault(site, []).append(_site_fn(rows, tc_in, gates))
    return hooks


def _read_all(fns: list[Callable[[torch.Tensor], None]]) -> SiteFn:
    def fn(x: torch.Tensor) -> None:
        with torch.no_grad():
            for f in fns:
                f(x)
    return fn


def _condition_reader(when: Condition, b: int, j: int, keep_BT: torch.Tensor, state: RowState,
                      gates: dict[tuple[int, int], torch.Tensor]) -> Callable[[torch.Tensor], None]:
    """Reads row ``b``'s condition of edit ``j`` into ``gates`` (and its latch into ``state``)."""
    def read(x: torch.Tensor) -> None:
        holds = when.holds(x[b:b + 1])
        on, latched = gate(holds, keep_BT[b:b + 1].to(holds.device), when.latch,
                           state.latched.get(j))
        if latched is not None:
            state.latched[j] = latched
        gates[(b, j)] = on
        state.fired = on.any() if state.fired is None else state.fired | on.any()
    return read


def _readout_reader(members: list[tuple[int, int, Readout]], pos_BT: torch.Tensor,
                    keep_BT: torch.Tensor, states: Sequence[RowState]
                    ) -> Callable[[torch.Tensor], None]:
    """Reads one readout (the same features of one SAE) for the rows of ``members`` in one
    encode and one copy to the host, then keeps each row's real (non-padding) positions."""
    rows = [b for b, _, _ in members]
    real_BT = (pos_BT[rows] >= 0).cpu()
    keep_GT = keep_BT[rows]

    def read(x: torch.Tensor) -> None:
        idx = torch.tensor(rows, device=x.device)
        values, features = members[0][2].read_rows(x.index_select(0, idx), keep_GT)
        for g, (b, k, _) in enumerate(members):
            real = real_BT[g]
            states[b].got[k] = ReadoutValues(values[g][real], features[g][real])
    return read


def _keep_input(store: dict[int, torch.Tensor], layer: int) -> SiteFn:
    def fn(x: torch.Tensor) -> None:
        store[layer] = x
    return fn


def _site_fn(rows: dict[int, list[tuple[RowEdit, torch.Tensor, int]]],
             tc_in: dict[int, torch.Tensor],
             gates: dict[tuple[int, int], torch.Tensor]) -> SiteFn:
    def fn(y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = y.clone()
            for b, items in rows.items():
                delta: torch.Tensor | None = None
                for e, m, j in items:
                    x = tc_in[e.site_in.layer] if e.site_in.reads_input else y
                    m = m.to(y.device)
                    if e.when is not None:
                        m = m & gates[(b, j)].to(y.device)
                    d = e.delta(x[b:b + 1], m)
                    delta = d if delta is None else delta + d
                assert delta is not None
                out[b:b + 1] = y[b:b + 1] + delta.to(device=y.device, dtype=y.dtype)
            return out
    return fn
