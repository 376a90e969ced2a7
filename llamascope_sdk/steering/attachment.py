"""``attach``: read, splice and intervene on SAE features in a live model, also in generate.

``attach`` places its hooks with :func:`llamascope_sdk.core.hooks.hooked` and returns an
:class:`Attachment`, which is also a context manager.

Per forward, each hooked output site does, in this order, for the clean activation y there:

1. every SAE of ``saes`` at that site encodes its clean input x (y itself, or for a transcoder
   the gain-free normalised input of ``post_attention_layernorm`` saved by a pre-hook) and the
   results are captured;
2. with ``splice=True`` the site's output becomes ``sae.decode(f') + error`` where f' is f after
   the interventions on that SAE and error = y - sae.decode(f) (for TC: mlp_out - tc(x_norm)),
   or ``sae.decode(f')`` alone with ``error_term=False``;
3. interventions on SAEs that are not spliced add (new - old) * d_i (see
   :mod:`llamascope_sdk.steering.interventions`).

Special positions (token id in ``special_ids``: BOS, EOS, pad) are left untouched and their
captured features are zero, unless ``include_special=True``. Absolute positions are tracked
across KV-cached steps from the cache length seen by the model's forward, so ``"prompt"`` and
``"generated"`` positions stay right inside ``model.generate``.

Without a KV cache (``generate(..., use_cache=False)``) every step is a fresh forward over the
whole sequence. The rule that keeps positions the same as with the cache: a forward that gets
*no cache object* and whose input ids extend the ids of the current sequence (same batch, the
old ids as prefix, longer) recomputes that sequence: ``prompt_len`` is kept and the captures are
replaced by this forward's (which cover every position again). Any other forward with an
empty cache starts a new sequence. Call :meth:`Attachment.reset` to start a new sequence by hand
(e.g. before scoring a prompt that happens to extend the previous one).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.hooks import SiteFn, hooked
from llamascope_sdk.core.sites import Site, decoder_layers
from llamascope_sdk.loading.compat import check_compatible, named_saes
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.interventions import Intervention, edit_delta, position_mask

CAPTURE_ALL = ("features", "inputs", "targets", "recons")


@dataclass
class _Slot:
    sae: SAE
    name: str
    site_in: Site
    site_out: Site
    read: bool  # in ``saes``: full encode, captured
    splice: bool
    interventions: list[Intervention] = field(default_factory=list)


@dataclass
class _Step:
    """What the model-level pre-hook learned about the forward in progress."""

    ids_BT: torch.Tensor | None
    past: int
    keep_BT: torch.Tensor | None  # False at special positions


def _special_ids_of(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(cfg, key, None)
            if isinstance(v, int):
                ids.add(v)
            elif isinstance(v, (list, tuple)):
                ids.update(int(i) for i in v)
    return ids


class Attachment:
    """Handle returned by :func:`attach`; a context manager that removes its hooks on exit.

    Captured per SAE name (``saes`` only), concatenated over every forward of the current
    sequence (a new sequence starts at a forward with an empty KV cache; KV-cached generate
    steps append along the sequence axis; a cache-less forward that extends the current ids
    replaces them, see the module docstring):

    * ``features[name]``: [B, T, F] feature activations of the clean input, in the SAE's dtype;
      zero at special positions unless ``include_special``. For a transcoder, read from the
      TC input (normalised resid_mid).
    * ``inputs[name]``: [B, T, D] clean activation at hook_point_in, in the model's dtype.
    * ``targets[name]``: [B, T, D] clean activation at hook_point_out (== inputs for R/A/M).
    * ``recons[name]``: [B, T, D] ``sae.decode(features)`` of the unmasked features, in the SAE's
      dtype (before any intervention), i.e. the reconstruction of ``targets``.
    * ``token_ids``: [B, T] input ids seen; ``mask``: [B, T] bool, False at special positions
      (all True with ``include_special``); ``prompt_len``: length of the first forward.
    """

    def __init__(self, model: nn.Module, slots: list[_Slot], *, error_term: bool,
                 include_special: bool, special_ids: Collection[int], capture: Collection[str]):
        self.model = model
        self.error_term = error_term
        self.include_special = include_special
        self.special_ids = sorted(set(special_ids))
        self.capture = frozenset(capture)
        self.prompt_len = 0
        self._slots = slots
        self._stack = ExitStack()
        self._step: _Step | None = None
        self._tc_in: dict[int, torch.Tensor] = {}
        self._chunks: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._id_chunks: list[torch.Tensor] = []
        self._mask_chunks: list[torch.Tensor] = []

    # ------------------------------------------------------------------ lifetime
    def _register(self) -> None:
        hooks: dict[Site, list[SiteFn]] = {}
        for layer in sorted({s.site_in.layer for s in self._slots if s.site_in.reads_input}):
            hooks[Site(layer, "ln2_normalized")] = [self._tc_input(layer)]
        for site_out in dict.fromkeys(s.site_out for s in self._slots):
            slots = [s for s in self._slots if s.site_out == site_out]
            hooks.setdefault(site_out, []).append(self._site_fn(slots))
        self._stack.enter_context(hooked(self.model, hooks, before_forward=self._on_model))

    def remove(self) -> None:
        """Remove every hook of this attachment (idempotent). Captures stay readable."""
        self._stack.close()
        self._tc_in.clear()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def reset(self) -> None:
        """Drop everything captured so far."""
        self._chunks = {}
        self._id_chunks, self._mask_chunks = [], []

    # ------------------------------------------------------------------ captures
    def _cat(self, what: str) -> dict[str, torch.Tensor]:
        return {name: torch.cat(c[what], dim=1) for name, c in self._chunks.items() if c.get(what)}

    @property
    def features(self) -> dict[str, torch.Tensor]:
        return self._cat("features")

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        return self._cat("inputs")

    @property
    def targets(self) -> dict[str, torch.Tensor]:
        return self._cat("targets")

    @property
    def recons(self) -> dict[str, torch.Tensor]:
        return self._cat("recons")

    @property
    def token_ids(self) -> torch.Tensor | None:
        return torch.cat(self._id_chunks, dim=1) if self._id_chunks else None

    @property
    def mask(self) -> torch.Tensor | None:
        return torch.cat(self._mask_chunks, dim=1) if self._mask_chunks else None

    # ------------------------------------------------------------------ hooks
    def _on_model(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        keep = None
        if ids is not None and not self.include_special and self.special_ids:
            keep = ~torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        if past == 0 and cache is None and self._extends_sequence(ids):
            self.reset()  # the same sequence recomputed with more tokens: keep prompt_len
        elif past == 0:  # a new sequence
            self.reset()
            first_input = ids if ids is not None else kwargs["inputs_embeds"]
            self.prompt_len = int(first_input.shape[1])
        self._step = _Step(ids, past, keep)
        if ids is not None:
            self._id_chunks.append(ids.detach())
            self._mask_chunks.append(keep if keep is not None else torch.ones_like(ids, dtype=torch.bool))

    def _extends_sequence(self, ids: torch.Tensor | None) -> bool:
        """True when ``ids`` [B, T] continue the current sequence: same batch size, longer, and
        the ids seen so far as their prefix (a cache-less generate step)."""
        prev = self.token_ids
        if ids is None or prev is None or ids.ndim != 2 or prev.shape[0] != ids.shape[0]:
            return False
        t = prev.shape[1]
        return ids.shape[1] > t and bool(torch.equal(ids[:, :t], prev.to(ids.device)))

    def _tc_input(self, layer: int) -> SiteFn:
        def fn(x: torch.Tensor) -> None:
            self._tc_in[layer] = x
        return fn

    def _site_fn(self, slots: list[_Slot]) -> SiteFn:
        def fn(y: torch.Tensor) -> torch.Tensor | None:
            with torch.no_grad():
                return self._run_site(slots, y)
        return fn

    def _positions(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(absolute positions [T], keep [B, T]) for the current forward."""
        b, t = y.shape[0], y.shape[1]
        st = self._step
        if st is None or st.ids_BT is None or tuple(st.ids_BT.shape) != (b, t):
            past = st.past if st is not None else 0
            return torch.arange(past, past + t, device=y.device), torch.ones(b, t, dtype=torch.bool, device=y.device)
        keep = st.keep_BT if st.keep_BT is not None else torch.ones(b, t, dtype=torch.bool)
        return torch.arange(st.past, st.past + t, device=y.device), keep.to(y.device)

    def _run_site(self, slots: list[_Slot], y: torch.Tensor) -> torch.Tensor | None:
        pos_T, keep_BT = self._positions(y)
        out: torch.Tensor | None = None  # new activation, model dtype
        delta: torch.Tensor | None = None  # summed (new - old) contributions, fp32-ish
        for slot in slots:
            sae = slot.sae
            x = self._tc_in.get(slot.site_in.layer) if slot.site_in.reads_input else y
            if x is None:
                raise RuntimeError(f"{slot.name}: the TC input hook did not run before mlp")
            f = sae.encode(x) if slot.read else None
            if f is not None:
                self._capture(slot, x, y, f, keep_BT)
            edits = [(iv, position_mask(iv.positions, pos_T, self.prompt_len)[None, :] & keep_BT)
                     for iv in slot.interventions]
            if slot.splice:
                assert f is not None
                out = self._splice(sae, y, f, edits, keep_BT)
                continue
            for iv, m_BT in edits:
                d = edit_delta(iv, x, f, m_BT)
                delta = d if delta is None else delta + d
        if out is None and delta is None:
            return None
        base = y if out is None else out
        if delta is not None:
            base = base + delta.to(device=base.device, dtype=base.dtype)
        return base

    def _capture(self, slot: _Slot, x: torch.Tensor, y: torch.Tensor, f: torch.Tensor,
                 keep_BT: torch.Tensor) -> None:
        c = self._chunks.setdefault(slot.name, {})
        if "features" in self.capture:
            c.setdefault("features", []).append(f * keep_BT[..., None].to(f))
        if "inputs" in self.capture:
            c.setdefault("inputs", []).append(x.detach())
        if "targets" in self.capture:
            c.setdefault("targets", []).append(y.detach())
        if "recons" in self.capture:
            c.setdefault("recons", []).append(slot.sae.decode(f))

    def _splice(self, sae: SAE, y: torch.Tensor, f: torch.Tensor,
                edits: list[tuple[Intervention, torch.Tensor]], keep_BT: torch.Tensor) -> torch.Tensor:
        f_new = f.clone() if edits else f
        for iv, m_BT in edits:
            idx = iv.idx
            old = f_new[..., idx]
            new = iv.target(old)
            f_new[..., idx] = torch.where(m_BT[..., None].to(old.device), new, old)
        # The error term is added in the wider of the two dtypes, so that a bf16 SAE on an
        # fp32 model does not round the clean activation to bf16.
        wide = torch.promote_types(y.dtype, sae.dtype)
        recon = sae.decode(f_new).to(device=y.device, dtype=wide)
        if self.error_term:
            clean = sae.decode(f).to(device=y.device, dtype=wide) if edits else recon
            recon = recon + (y.to(wide) - clean)
        recon = recon.to(y.dtype)
        # Special positions keep the clean activation.
        return torch.where(keep_BT[..., None].to(y.device), recon, y)


def attach(model: nn.Module, saes: SAE | Sequence[SAE] | Mapping[str, SAE] = (), *,
           interventions: Intervention | Iterable[Intervention] = (), splice: bool = False,
           error_term: bool = True, include_special: bool = False,
           special_ids: Collection[int] | None = None,
           capture: bool | Collection[str] = ("features",)) -> Attachment:
    """Hook SAEs into a Llama model to read features, splice reconstructions and intervene.

    Args:
        model: a transformers Llama-family causal LM (``model.model.layers``).
        saes: SAEs to read (full encode, captured on the handle, see :class:`Attachment`);
            a list (names from ``sae.name``, made unique with ``#2``...) or a name -> SAE dict.
            Several SAEs, also at one site, are allowed; all read the clean activation.
        interventions: :class:`~llamascope_sdk.steering.interventions.Steer`/``Clamp``/``Scale``/``Ablate``;
            their SAEs need not be in ``saes`` (then only their features' encoder rows are used).
        splice: replace each read SAE's hook_point_out activation by its reconstruction
            (at most one spliced SAE per site).
        error_term: with ``splice``, add back error = y - sae(x) of the clean activation, so that
            splicing without interventions leaves the model unchanged.
        include_special: also read/edit BOS, EOS and pad positions (off by default: the recipe
            dropped them and they are far out of distribution).
        special_ids: token ids counted as special; default the model config's bos/eos/pad ids.
            Pass ``models.special_ids(tokenizer)`` for the tokenizer's full list.
        capture: which tensors to keep on the handle: one or a subset of ``features``, ``inputs``,
            ``targets``, ``recons`` (default features only: a 131k-feature SAE's inputs,
            targets and reconstructions during generation add up fast), True for all four,
            False for none (pure steering).

    Returns:
        The :class:`Attachment` (use as ``with attach(...) as h:``; else call ``h.remove()``).

    Raises:
        IncompatibleModelError: SAE width differs from the model's hidden size; layer out of range.
        HookpointNotFoundError: the model's layers lack the module a site needs.
        ValueError: the same SAE object passed twice in ``saes``, or the same intervention
            object twice; an unknown ``capture`` name; a flag that is not a bool (InputError).
        TypeError: an intervention that is not Steer/Clamp/Scale/Ablate.

    Example:
        >>> with attach(model, [sae], interventions=[Steer(sae, [42], 8.0)]) as h:
        ...     out = model.generate(ids, max_new_tokens=20)
        >>> h.features[sae.name].shape  # [1, prompt + generated - 1, d_sae]
    """
    named = named_saes(saes)
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    for flag, value in (("splice", splice), ("error_term", error_term),
                        ("include_special", include_special)):
        if not isinstance(value, bool):
            raise InputError(f"attach: {flag} must be True or False, got {value!r}")
    seen_ivs: set[int] = set()
    for i, iv in enumerate(ivs):
        if not isinstance(iv, Intervention):
            raise TypeError(f"interventions must be Steer/Clamp/Scale/Ablate, got "
                            f"{type(iv).__name__} at position {i}")
        if id(iv) in seen_ivs:
            raise ValueError(f"interventions: the same {type(iv).__name__} object is given twice "
                             f"(position {i}); pass it once (it would be applied twice)")
        seen_ivs.add(id(iv))
    if special_ids is not None and not all(
            isinstance(t, int) and not isinstance(t, bool) for t in special_ids):
        raise InputError(f"attach: special_ids must be token ids (ints), got {special_ids!r}")
    if isinstance(capture, str):
        capture = (capture,)
    decoder_layers(model)
    slots: dict[int, _Slot] = {}
    for name, sae in named.items():
        slots[id(sae)] = _make_slot(model, sae, name, read=True, splice=splice)
    for iv in ivs:
        if id(iv.sae) not in slots:
            slots[id(iv.sae)] = _make_slot(model, iv.sae, iv.sae.name, read=False, splice=False)
        slots[id(iv.sae)].interventions.append(iv)
    spliced: dict[Site, str] = {}
    for s in slots.values():
        if s.splice and s.site_out in spliced:
            raise ValueError(f"splice=True with two SAEs at {s.site_out.hook_point} "
                             f"({spliced[s.site_out]}, {s.name}): only one can replace an "
                             "activation; read the other in a separate attach()")
        if s.splice:
            spliced[s.site_out] = s.name
    if capture is True:
        capture = CAPTURE_ALL
    elif capture is False:
        capture = ()
    bad = set(capture) - set(CAPTURE_ALL)
    if bad:
        raise ValueError(f"capture: unknown names {sorted(bad)}; allowed are {list(CAPTURE_ALL)}")
    ids = _special_ids_of(model) if special_ids is None else set(special_ids)
    handle = Attachment(model, list(slots.values()), error_term=error_term,
                        include_special=include_special, special_ids=ids, capture=capture)
    handle._register()
    return handle


def _make_slot(model: nn.Module, sae: SAE, name: str, *, read: bool, splice: bool) -> _Slot:
    site_in, site_out = check_compatible(model, sae, name)
    return _Slot(sae, name, site_in, site_out, read=read, splice=splice and read)
