"""The steering spec: the one table of modes and the one definition of a steering entry.

A steering entry is the JSON object that names one edit, as ``llamascope serve`` requests carry
it (``steering: [...]``), ``eval-steer --export-serve`` writes it and the lm-eval export reads
its mode::

    {"sae": "demo", "feature": 4154 | [4154, 1297], "mode": "add", "value": 40.0,
     "relative": false, "positions": "generated", "mean": false,
     "when": {"sae": "demo", "feature": 1297, "above": 2.0, "latch": false}}

:data:`MODES` is the table of modes: each names its intervention class, the argument its
``value`` fills, and what it can do (swept by eval-steer, exported to lm-eval). Adding a mode is
one row here (and its intervention class); serve, eval-steer, the lm-eval export and the CLI
read this table. :class:`SteeringEntry` parses (:meth:`SteeringEntry.parse`), emits
(:meth:`SteeringEntry.to_json`), builds the intervention (:meth:`SteeringEntry.intervention`)
and is built back from one (:meth:`SteeringEntry.of`); :func:`entry_schema` is its JSON schema.
A readout entry (``readout: {...}``) is defined here too (:class:`ReadoutEntry`).

Every parse error is a :class:`~llamascope_sdk.base.errors.FieldError` naming the field
(``steering[2].value``) and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llamascope_sdk.base.errors import FieldError
from llamascope_sdk.steering.conditions import DirectionCondition, FeatureCondition
from llamascope_sdk.steering.interventions import Ablate, Clamp, Intervention, Scale, Steer

POSITIONS = ("prompt", "generated", "all")


@dataclass(frozen=True)
class Mode:
    """One row of the mode table."""

    name: str
    intervention: type[Intervention]
    #: the intervention's argument that the entry's ``value`` fills; None: the mode takes none
    value_arg: str | None
    #: what ``value`` means, for help texts and errors
    value_means: str
    #: eval-steer sweeps ``value`` for this mode
    sweep: bool
    #: the lm-eval ``steered`` action this mode exports to, or None (not exportable)
    lm_eval_action: str | None
    #: builds from decoder rows alone (no SAE encoder needed): the pool can steer an
    #: unloaded SAE
    rows_only: bool


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("add", Steer, "strength", "the length of the added vector (model units)", True, "add",
         True),
    Mode("clamp", Clamp, "value", "the value the activation is set to", True, None, False),
    Mode("scale", Scale, "factor", "the factor the activation is multiplied by", True, None,
         False),
    Mode("ablate", Ablate, None, "no value (\"mean\": true ablates to the mean)", False, None,
         False),
)}
#: modes eval-steer can sweep
SWEEP_MODES = tuple(m.name for m in MODES.values() if m.sweep)
ENTRY_FIELDS = ("sae", "feature", "mode", "value", "relative", "positions", "mean", "when")
WHEN_FIELDS = ("sae", "feature", "direction", "hook_point", "above", "latch")
READOUT_FIELDS = ("sae", "features", "top_k")


def mode_of(iv: Intervention) -> Mode:
    """The table row of an intervention's class."""
    for m in MODES.values():
        if type(iv) is m.intervention:
            return m
    raise FieldError(f"{type(iv).__name__} is no steering mode; allowed are "
                     f"{', '.join(m.intervention.__name__ for m in MODES.values())}", "mode")


def check_mode(mode: Any, param: str = "mode", allowed: tuple[str, ...] = tuple(MODES)) -> Mode:
    """The row of ``mode``, or a :class:`FieldError` listing the allowed ones."""
    if mode not in allowed:
        raise FieldError(f"{param}: unknown mode {mode!r}; allowed are {', '.join(allowed)}",
                         param)
    return MODES[mode]


def make_edit(mode: str, sae: Any, features: Any, value: Any = None, /,
              **kw: Any) -> Intervention:
    """The intervention of ``mode`` (a row of :data:`MODES`) on ``sae``: ``value`` fills the
    mode's value argument (strength, value, factor; none for ablate); ``kw`` the others
    (``positions``, ``relative``, ``when``, Ablate's own ``mode``...)."""
    row = check_mode(mode)
    if row.value_arg is not None:
        kw[row.value_arg] = value
    return row.intervention(sae, features, **kw)  # type: ignore[call-arg]


@dataclass(frozen=True)
class WhenEntry:
    """A condition: a feature of an SAE, or a direction at a hook point, above a threshold."""

    above: float
    sae: str | None = None
    feature: int | None = None
    direction: tuple[float, ...] | None = None
    hook_point: str | None = None
    latch: bool = False

    @classmethod
    def parse(cls, raw: Any, param: str) -> WhenEntry:
        """Check a ``when`` object (see the module docstring)."""
        _check_object(raw, param, WHEN_FIELDS, "an object with sae, feature and above (or "
                      "direction, hook_point and above)")
        above = raw.get("above")
        if not _is_number(above):
            raise FieldError(f"{param}.above must be a finite number, got {above!r}",
                             f"{param}.above")
        latch = raw.get("latch", False)
        if not isinstance(latch, bool):
            raise FieldError(f"{param}.latch must be true or false, got {latch!r}", f"{param}.latch")
        if "direction" in raw or "hook_point" in raw:
            return cls._direction(raw, param, float(above), latch)
        sae, feat = raw.get("sae"), raw.get("feature")
        _check_sae(sae, f"{param}.sae")
        if isinstance(feat, bool) or not isinstance(feat, int):
            raise FieldError(f"{param}.feature must be one integer, got {feat!r}",
                             f"{param}.feature")
        return cls(float(above), sae=sae.strip(), feature=feat, latch=latch)

    @classmethod
    def _direction(cls, raw: dict[str, Any], param: str, above: float, latch: bool) -> WhenEntry:
        if "sae" in raw or "feature" in raw:
            raise FieldError(f"{param}: give sae and feature, or direction and hook_point, not "
                             "both", param)
        vec, hp = raw.get("direction"), raw.get("hook_point")
        if not isinstance(vec, list) or not vec or not all(_is_number(v) for v in vec):
            raise FieldError(f"{param}.direction must be a non-empty list of finite numbers",
                             f"{param}.direction")
        if not isinstance(hp, str) or not hp.strip():
            raise FieldError(f"{param}.hook_point must be a hook point such as "
                             "'blocks.5.hook_resid_post'", f"{param}.hook_point")
        return cls(above, direction=tuple(float(v) for v in vec), hook_point=hp.strip(),
                   latch=latch)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = ({"sae": self.sae, "feature": self.feature}
                               if self.direction is None else
                               {"direction": list(self.direction), "hook_point": self.hook_point})
        out["above"] = self.above
        if self.latch:
            out["latch"] = True
        return out


@dataclass(frozen=True)
class SteeringEntry:
    """One checked steering entry; ``param`` names it in errors (``steering[2]``)."""

    sae: str
    features: tuple[int, ...]
    mode: str = "add"
    value: float | tuple[float, ...] | None = None
    relative: bool = False
    positions: str = "all"
    mean: bool = False
    when: WhenEntry | None = None
    param: str = field(default="steering[0]", compare=False)

    @property
    def row(self) -> Mode:
        return MODES[self.mode]

    @classmethod
    def parse(cls, raw: Any, param: str = "steering[0]", *,
              default_positions: str = "all") -> SteeringEntry:
        """Check one entry. Raises :class:`FieldError` naming the field and what is allowed."""
        _check_object(raw, param, ENTRY_FIELDS, "an object with sae, feature, mode and value")
        sae = raw.get("sae")
        _check_sae(sae, f"{param}.sae")
        feats = _features(raw.get("feature"), f"{param}.feature")
        mode = check_mode(raw.get("mode", "add"), f"{param}.mode")
        value = _value(raw.get("value"), mode, f"{param}.value")
        relative = raw.get("relative", False)
        if not isinstance(relative, bool) or (relative and mode.name != "add"):
            raise FieldError(f"{param}.relative must be true or false, and true only with mode "
                             "add", f"{param}.relative")
        mean = raw.get("mean", False)
        if not isinstance(mean, bool) or (mean and mode.name != "ablate"):
            raise FieldError(f"{param}.mean must be true or false, and true only with mode "
                             "ablate", f"{param}.mean")
        positions = raw.get("positions", default_positions)
        if positions not in POSITIONS:
            raise FieldError(f"{param}.positions: {positions!r} is not allowed; allowed are "
                             f"{', '.join(POSITIONS)}", f"{param}.positions")
        when = raw.get("when")
        return cls(sae.strip(), feats, mode.name, value, relative, positions, mean,
                   None if when is None else WhenEntry.parse(when, f"{param}.when"), param)

    def to_json(self) -> dict[str, Any]:
        """The entry as JSON (what :meth:`parse` reads back to an equal entry)."""
        out: dict[str, Any] = {"sae": self.sae, "feature": (list(self.features)
                               if len(self.features) > 1 else self.features[0]), "mode": self.mode}
        if self.value is not None:
            out["value"] = list(self.value) if isinstance(self.value, tuple) else self.value
        if self.mode == "add":
            out["relative"] = self.relative
        if self.mode == "ablate":
            out["mean"] = self.mean
        out["positions"] = self.positions
        if self.when is not None:
            out["when"] = self.when.to_json()
        return out

    def intervention(self, sae: Any, when: Any = None) -> Intervention:
        """The intervention on the loaded ``sae`` (``when``: the built condition, if any)."""
        kw: dict[str, Any] = {"positions": self.positions, "when": when}
        if self.mode == "add":
            kw["relative"] = self.relative
        if self.mode == "ablate":
            kw["mode"] = "mean" if self.mean else "zero"
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return make_edit(self.mode, sae, list(self.features), value, **kw)

    @classmethod
    def of(cls, iv: Intervention, sae_spec: str) -> SteeringEntry:
        """The entry of a built intervention (its SAE named ``sae_spec``; a condition on a
        feature of the same SAE names it so too). Raises :class:`FieldError` for positions a
        JSON entry cannot name."""
        mode = mode_of(iv)
        if not isinstance(iv.positions, str):
            raise FieldError(f"a steering entry takes positions {', '.join(POSITIONS)}, not "
                             f"{iv.positions!r}", "positions")
        value = None if mode.value_arg is None else _plain(getattr(iv, mode.value_arg))
        return cls(sae_spec, tuple(int(i) for i in iv.idx.tolist()), mode.name, value,
                   bool(getattr(iv, "relative", False)), iv.positions,
                   getattr(iv, "mode", "zero") == "mean", _when_of(iv, sae_spec))


@dataclass(frozen=True)
class ReadoutEntry:
    """One readout: features of an SAE by index, or the ``top_k`` largest per token."""

    sae: str
    features: tuple[int, ...] | None = None
    top_k: int | None = None
    param: str = field(default="readout", compare=False)

    @classmethod
    def parse(cls, raw: Any, param: str = "readout") -> ReadoutEntry:
        _check_object(raw, param, READOUT_FIELDS, "an object with sae and features (or top_k)")
        sae = raw.get("sae")
        _check_sae(sae, f"{param}.sae")
        if ("features" in raw) == ("top_k" in raw):
            raise FieldError(f"{param}: give features (a list of indices) or top_k, exactly "
                             "one of them", param)
        if "features" in raw:
            return cls(sae.strip(), features=_features(raw["features"], f"{param}.features"),
                       param=param)
        k = raw["top_k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise FieldError(f"{param}.top_k must be a positive integer, got {k!r}",
                             f"{param}.top_k")
        return cls(sae.strip(), top_k=k, param=param)

    def to_json(self) -> dict[str, Any]:
        return ({"sae": self.sae, "features": list(self.features)} if self.features is not None
                else {"sae": self.sae, "top_k": self.top_k})


def parse_steering(raw: Any, *, max_edits: int, default_positions: str = "all",
                   param: str = "steering") -> list[SteeringEntry]:
    """The ``steering`` field: absent, null or false (no edits), or a list of entries."""
    if raw is None or raw is False:
        return []
    if not isinstance(raw, list):
        raise FieldError(f"{param} must be a list of edits or false, got {raw!r}", param)
    if len(raw) > max_edits:
        raise FieldError(f"{param} has {len(raw)} edits, more than the limit of {max_edits} "
                         "per request", param)
    return [SteeringEntry.parse(e, f"{param}[{i}]", default_positions=default_positions)
            for i, e in enumerate(raw)]


def parse_readout(raw: Any, *, max_readouts: int = 4,
                  param: str = "readout") -> list[ReadoutEntry]:
    """The ``readout`` field: absent or null (none), one readout object, or a list of them."""
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else [raw]
    if not items or len(items) > max_readouts:
        raise FieldError(f"{param} takes one readout object or a list of 1 to {max_readouts}",
                         param)
    return [ReadoutEntry.parse(r, param if not isinstance(raw, list) else f"{param}[{i}]")
            for i, r in enumerate(items)]


def entry_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of one steering entry, built from :data:`MODES`."""
    number_or_list = {"oneOf": [{"type": "number"},
                                {"type": "array", "items": {"type": "number"}, "minItems": 1}]}
    when = {"type": "object", "additionalProperties": False, "required": ["above"],
            "properties": {"sae": {"type": "string"}, "feature": {"type": "integer"},
                           "direction": {"type": "array", "items": {"type": "number"},
                                         "minItems": 1},
                           "hook_point": {"type": "string"}, "above": {"type": "number"},
                           "latch": {"type": "boolean"}},
            "oneOf": [{"required": ["sae", "feature"]}, {"required": ["direction", "hook_point"]}]}
    valued = [m.name for m in MODES.values() if m.value_arg is not None]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "llamascope steering entry", "type": "object", "additionalProperties": False,
        "required": ["sae", "feature"],
        "properties": {
            "sae": {"type": "string", "minLength": 1},
            "feature": {"oneOf": [{"type": "integer", "minimum": 0},
                                  {"type": "array", "items": {"type": "integer", "minimum": 0},
                                   "minItems": 1}]},
            "mode": {"enum": list(MODES), "default": "add"},
            "value": number_or_list, "relative": {"type": "boolean"},
            "positions": {"enum": list(POSITIONS)}, "mean": {"type": "boolean"}, "when": when},
        "allOf": [{"if": {"properties": {"mode": {"enum": valued}}},
                   "then": {"required": ["value"]},
                   "else": {"not": {"required": ["value"]}}}],
    }


# --------------------------------------------------------------------------- field checks
def _check_object(raw: Any, param: str, allowed: tuple[str, ...], what: str) -> None:
    if not isinstance(raw, dict):
        raise FieldError(f"{param} must be {what}", param)
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise FieldError(f"{param}: unknown field {unknown[0]!r}; allowed are "
                         f"{', '.join(allowed)}", f"{param}.{unknown[0]}")


def _check_sae(sae: Any, param: str) -> None:
    if not isinstance(sae, str) or not sae.strip():
        raise FieldError(f"{param} must be an SAE name (e.g. 'demo' or 'L12R-8x')", param)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _features(raw: Any, param: str) -> tuple[int, ...]:
    feats = raw if isinstance(raw, list) else [raw]
    if not feats or not all(isinstance(f, int) and not isinstance(f, bool) for f in feats):
        raise FieldError(f"{param} must be an integer or a non-empty list of integers, got "
                         f"{raw!r}", param)
    return tuple(int(f) for f in feats)


def _value(raw: Any, mode: Mode, param: str) -> float | tuple[float, ...] | None:
    if mode.value_arg is None:
        if raw is not None:
            raise FieldError(f"{param}: {mode.name} takes {mode.value_means}", param)
        return None
    vals = raw if isinstance(raw, list) else [raw]
    if raw is None or not vals or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
        raise FieldError(f"{param} must be a number (or one per feature) for mode {mode.name}: "
                         f"{mode.value_means}; got {raw!r}", param)
    if not all(math.isfinite(v) for v in vals):
        raise FieldError(f"{param} must be finite, got {raw!r}", param)
    return tuple(float(v) for v in raw) if isinstance(raw, list) else float(raw)


def _when_of(iv: Intervention, sae_spec: str) -> WhenEntry | None:
    w = iv.when
    if isinstance(w, FeatureCondition):
        return WhenEntry(float(w.above), sae=sae_spec if w.sae is iv.sae else w.sae.name,
                         feature=w.feature, latch=w.latch)
    if isinstance(w, DirectionCondition):
        return WhenEntry(float(w.above), direction=tuple(float(x) for x in w.direction.tolist()),
                         hook_point=w.site.hook_point, latch=w.latch)
    return None


def _plain(v: Any) -> float | tuple[float, ...]:
    import torch

    t = torch.as_tensor(v, dtype=torch.float64).reshape(-1).tolist()
    return float(t[0]) if len(t) == 1 else tuple(float(x) for x in t)


__all__ = ["MODES", "Mode", "POSITIONS", "ReadoutEntry", "SWEEP_MODES", "SteeringEntry",
           "WhenEntry", "check_mode", "entry_schema", "make_edit", "mode_of", "parse_readout",
           "parse_steering"]
