"""Batched generation where every row carries its own feature edits.

:class:`BatchGenerator` runs many prompts as one batch, one forward per step, each row with its
own interventions (:mod:`llamascope_sdk.steering.row_edits`) or none. Rows can join while others are
generating (their prompts are prefilled in one forward and their KV cache merged into the
batch's, left-padded) and leave when they finish or are cancelled (their cache rows dropped):
continuous batching. :func:`generate_batch` is the one-call form.

Exactness: a row's tokens are computed as if it ran alone. Left padding is masked, each row's
positions count from its own first token (``position_ids``), and its edits see its own
positions, so greedy decoding in fp32 gives the tokens that
:func:`~llamascope_sdk.steering.generation.compare_generations` gives for the same prompt and
interventions (checked in tests/test_batch_generation.py).

Decoding: greedy (``temperature=0``, the default), or sampling with ``temperature`` and
``top_p`` from a per-row generator seeded by ``seed``. A row stops after one of its stop ids
(default: the model's EOS ids), included in its tokens like ``model.generate`` does, or after
``max_new_tokens``.

Log-probabilities: a row with ``logprobs=N`` gets, on each of its tokens, the token's
log-probability and the N most likely tokens (:mod:`llamascope_sdk.steering.logprobs`); a row
with ``prompt_logprobs`` gets, on its first event, its prompt's tokens scored the same way, under
its edits, from the same prefill forward (``max_new_tokens=0`` then scores the prompt only: one
event with no token).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.hooks import hooked
from llamascope_sdk.corpus import pad_id
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.models import check_fits_window, model_device, special_ids
from llamascope_sdk.steering.generation import prompt_ids
from llamascope_sdk.steering.interventions import Intervention
from llamascope_sdk.steering.logprobs import MAX_TOP, FinalHidden, Logprobs, prompt_logprobs, score
from llamascope_sdk.steering.readout import Readout, ReadoutValues
from llamascope_sdk.steering.row_edits import RowEdit, RowState, as_row_edits, row_hooks


@dataclass
class Row:
    """One prompt to continue: its token ids (BOS or chat template included), its edits, and
    the features to read at each of its tokens (``readouts``, handed out on its
    :class:`Token` events)."""

    ids: Sequence[int]
    edits: Sequence[Intervention | RowEdit] = ()
    max_new_tokens: int = 40
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: Collection[int] | None = None
    readouts: Sequence[Readout] = ()
    logprobs: int | None = None  #: top-N alternatives per token (0: the token's own only)
    prompt_logprobs: bool = False  #: score the prompt's tokens too (first event's ``prompt``)


@dataclass
class Token:
    """A token produced for row ``row``; ``finish`` is "stop" or "length" on its last event.

    For a row with readouts, ``readout`` holds what the forward that produced this event read
    (one :class:`~llamascope_sdk.steering.readout.ReadoutValues` per readout) at the tokens
    ``read_ids`` it ran on: the prompt at the first event, then the previous token. The last
    token is read by one more forward, whose event has no token (``token`` None) and carries
    ``finish``.

    ``token`` is also None for a row with ``max_new_tokens=0`` (its prompt scored, nothing
    generated). ``logprob`` and ``top`` (``(id, log-probability)``, most likely first) when the
    row asked for ``logprobs``; ``prompt`` on the row's first event when it asked for
    ``prompt_logprobs``.
    """

    row: int
    token: int | None
    finish: str | None = None
    readout: list[ReadoutValues] | None = None
    read_ids: list[int] | None = None
    #: on the last event: whether a condition of the row's edits held anywhere (None: none)
    fired: bool | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    prompt: Logprobs | None = None


@dataclass
class Generation:
    """What :func:`generate_batch` returns per prompt: the new token ids and their text."""

    ids: list[int]
    text: str
    finish: str
    #: whether a condition of the row's edits held at some position (None: no conditions)
    fired: bool | None = None


@dataclass
class _State:
    handle: int
    row: Row
    edits: list[RowEdit]
    prompt_len: int
    stops: frozenset[int]
    offset: int = 0  # left-padding columns of this row in the batch's cache
    out: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    state: RowState = field(default_factory=RowState)
    finishing: str | None = None  # finished, one forward left to read its last token


class BatchGenerator:
    """A batch of rows generating together; see the module docstring.

    Call :meth:`add` to queue rows, :meth:`step` to advance every row by one token (rows
    queued since the last step are prefilled and join), :meth:`cancel` to drop a row. Not
    thread-safe: one thread drives it.

    Example:
        >>> gen = BatchGenerator(model, tok)
        >>> a = gen.add(Row(ids_a, [Steer(sae, [4154], 80.0)]))
        >>> b = gen.add(Row(ids_b))             # no edits: untouched
        >>> while gen.busy:
        ...     for t in gen.step(): print(t.row, t.token, t.finish)
    """

    def __init__(self, model: Any, tokenizer: Any = None, *,
                 special: Collection[int] | None = None, pad: int | None = None) -> None:
        self.model = model
        self.device = model_device(model)
        self.special = sorted(special if special is not None else
                              (special_ids(tokenizer) if tokenizer is not None else ()))
        self.pad = pad if pad is not None else (pad_id(tokenizer) if tokenizer is not None else 0)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos = frozenset([eos] if isinstance(eos, int) else (eos or ()))
        self._handles = itertools.count()
        self._pending: list[_State] = []
        self._rows: list[_State] = []  # the batch, in cache order
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, L] 1 = real token
        self._cancelled: set[int] = set()
        # transformers 5 calls the KV cache ``cache``; earlier versions ``past_key_values``
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # ------------------------------------------------------------------ queue
    def add(self, row: Row) -> int:
        """Queue ``row`` (checked now); it joins the batch at the next :meth:`step`.

        Raises:
            InputError: empty ids, no new tokens, a bad temperature/top_p, or prompt plus
                ``max_new_tokens`` beyond the model's window.
            IncompatibleModelError: an edit's SAE does not fit the model.
        """
        ids = [int(i) for i in row.ids]
        if not ids:
            raise InputError("the prompt is empty (no token ids)", hint="give some text")
        if row.max_new_tokens < (0 if row.prompt_logprobs else 1):
            raise InputError(f"max_new_tokens must be at least 1 (0 only with prompt_logprobs), "
                             f"got {row.max_new_tokens}")
        if row.logprobs is not None and not 0 <= row.logprobs <= MAX_TOP:
            raise InputError(f"logprobs must be in 0..{MAX_TOP}, got {row.logprobs}")
        if not (row.temperature >= 0 and row.temperature < float("inf")):
            raise InputError(f"temperature must be a finite number >= 0, got {row.temperature}")
        if not 0 < row.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {row.top_p}")
        check_fits_window(self.model, len(ids), row.max_new_tokens)
        for r in row.readouts:
            check_compatible(self.model, r.sae, r.name)
        gen = None
        if row.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(row.seed if row.seed is not None else torch.seed())
        stops = frozenset(row.stop_ids) if row.stop_ids is not None else self.eos
        st = _State(next(self._handles), row, as_row_edits(self.model, row.edits), len(ids),
                    stops, generator=gen, state=RowState(list(row.readouts)))
        self._pending.append(st)
        return st.handle

    def cancel(self, handle: int) -> None:
        """Drop a row (queued or generating); its cache rows are freed at the next step."""
        self._cancelled.add(handle)

    @property
    def busy(self) -> bool:
        """True while some row is queued or generating."""
        return bool(self._pending or self._rows)

    @property
    def size(self) -> int:
        """Rows generating now plus rows queued."""
        return len(self._rows) + len(self._pending)

    def edits_of(self, handle: int) -> list[RowEdit]:
        for st in itertools.chain(self._rows, self._pending):
            if st.handle == handle:
                return st.edits
        return []

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self) -> list[Token]:
        """Advance every generating row by one token (one forward), prefill the rows queued
        since the last step (one more forward) and let them join; return the new tokens."""
        self._drop([st.handle for st in self._rows if st.handle in self._cancelled])
        self._pending = [st for st in self._pending if st.handle not in self._cancelled]
        self._cancelled.clear()
        events: list[Token] = []
        if self._rows:
            events += self._decode()
        if self._pending:
            new, self._pending = self._pending, []
            events += self._prefill(new)
        self._drop([e.row for e in events if e.finish is not None])
        return events

    def _forward(self, rows: list[_State], ids_BT: torch.Tensor, mask_BL: torch.Tensor,
                 pos_BT: torch.Tensor, cache: Any,
                 prompts: bool = False) -> tuple[torch.Tensor, Any, list[Logprobs | None]]:
        """Last-position logits [B, V], the cache, and (``prompts``) each row's prompt scored
        when it asked for ``prompt_logprobs`` (from the final hidden states of this forward)."""
        keep = mask_BL[:, -ids_BT.shape[1]:].bool()
        if self.special:
            keep &= ~torch.isin(ids_BT, torch.tensor(self.special, device=ids_BT.device))
        hooks = row_hooks([st.edits for st in rows], pos_BT, [st.prompt_len for st in rows], keep,
                          [st.state for st in rows])
        # A forward that only reads the last tokens of finishing rows stops after the last
        # site it reads (their logits and cache are not needed: the rows leave after it).
        drain = bool(hooks) and all(st.finishing is not None for st in rows)
        scored: list[Logprobs | None] = [None] * len(rows)
        want = prompts and any(st.row.prompt_logprobs for st in rows)
        final = FinalHidden(self.model, active=want)
        out = None
        with hooked(self.model, hooks, stop_after_last=drain), final:
            out = self.model(input_ids=ids_BT, attention_mask=mask_BL,
                             position_ids=pos_BT.clamp(min=0), use_cache=True, logits_to_keep=1,
                             **{self._cache_arg: cache})
            if final.hidden_BTD is not None:
                for b, st in enumerate(rows):
                    if st.row.prompt_logprobs:
                        scored[b] = prompt_logprobs(self.model, final.hidden_BTD[b, st.offset:],
                                                    st.row.ids, st.row.logprobs or 0)
        if out is None:
            return torch.zeros(len(rows), 1, device=ids_BT.device), cache, scored
        return out.logits[:, -1, :], getattr(out, self._cache_arg), scored

    def _decode(self) -> list[Token]:
        assert self._mask is not None
        rows = self._rows
        n_cols = self._mask.shape[1]
        ids = torch.tensor([[st.out[-1]] for st in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        pos = torch.tensor([[n_cols - st.offset] for st in rows], device=self.device)
        logits, self._cache, _ = self._forward(rows, ids, mask, pos, self._cache)
        self._mask = mask
        return self._emit(rows, logits, [[st.out[-1]] for st in rows])

    def _prefill(self, rows: list[_State]) -> list[Token]:
        width = max(st.prompt_len for st in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, st in enumerate(rows):
            st.offset = width - st.prompt_len
            ids[b, st.offset:] = torch.tensor([int(i) for i in st.row.ids])
            mask[b, st.offset:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = torch.arange(width, device=self.device)[None, :] - torch.tensor(
            [[st.offset] for st in rows], device=self.device)
        from transformers import DynamicCache

        logits, cache, scored = self._forward(rows, ids, mask, pos, DynamicCache(), prompts=True)
        events = self._emit(rows, logits, [[int(i) for i in st.row.ids] for st in rows], scored)
        going = [b for b, e in enumerate(events) if e.finish is None]
        if going:  # rows done at their first token (a loglikelihood request) never join
            if len(going) < len(rows):
                idx = torch.tensor(going, device=mask.device)
                for layer in cache.layers:
                    layer.keys = layer.keys.index_select(0, idx)
                    layer.values = layer.values.index_select(0, idx)
                mask = _trim_left(mask.index_select(0, idx), [rows[b] for b in going], cache)
            self._merge([rows[b] for b in going], cache, mask)
        return events

    def _emit(self, rows: list[_State], logits: torch.Tensor, read_ids: list[list[int]],
              scored: Sequence[Logprobs | None] | None = None) -> list[Token]:
        events = []
        for b, st in enumerate(rows):
            read, ids = (st.state.read, read_ids[b]) if st.state.readouts else (None, None)
            prompt = scored[b] if scored is not None else None
            if st.finishing is not None or st.row.max_new_tokens == 0:
                # this forward only read the last token, or scored the prompt of a row that
                # generates nothing
                events.append(Token(st.handle, None, st.finishing or "length", read, ids,
                                    prompt=prompt))
                events[-1].fired = None if st.state.fired is None else bool(st.state.fired)
                continue
            tok = self._pick(st, logits[b])
            st.out.append(tok)
            finish = ("stop" if tok in st.stops else
                      "length" if len(st.out) >= st.row.max_new_tokens else None)
            if finish is not None and st.state.readouts:
                st.finishing, finish = finish, None  # one more forward reads this token
            ev = Token(st.handle, tok, finish, read, ids, prompt=prompt)
            if st.row.logprobs is not None:
                got = score(logits[b:b + 1], torch.tensor([tok]), st.row.logprobs)
                ev.logprob, ev.top = got.token[0], got.top[0]
            if finish is not None:
                ev.fired = None if st.state.fired is None else bool(st.state.fired)
            events.append(ev)
        return events

    @staticmethod
    def _pick(st: _State, logits: torch.Tensor) -> int:
        if st.generator is None:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / st.row.temperature, dim=-1)
        if st.row.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            cut = (sorted_p.cumsum(0) - sorted_p) >= st.row.top_p
            sorted_p[cut] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=st.generator))

    # ------------------------------------------------------------------ the batch's cache
    def _merge(self, rows: list[_State], cache: Any, mask: torch.Tensor) -> None:
        """Append ``rows`` (with their own cache and mask) to the batch, left-padding the
        shorter of the two so that every row's tokens end at the last column."""
        if not self._rows:
            self._rows, self._cache, self._mask = list(rows), cache, mask
            return
        assert self._mask is not None
        la, lb = self._mask.shape[1], mask.shape[1]
        width = max(la, lb)
        for st in self._rows:
            st.offset += width - la
        for st in rows:
            st.offset += width - lb
        for old, new in zip(self._cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)])
            old.values = torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._rows += rows

    def _drop(self, handles: Sequence[int]) -> None:
        """Remove rows from the batch and the padding columns no remaining row needs."""
        gone = set(handles)
        if not gone or not any(st.handle in gone for st in self._rows):
            return
        keep = [b for b, st in enumerate(self._rows) if st.handle not in gone]
        self._rows = [self._rows[b] for b in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        trim = min(st.offset for st in self._rows)
        idx = torch.tensor(keep, device=self._mask.device)
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, trim:]
            layer.values = layer.values.index_select(0, idx)[:, :, trim:]
        self._mask = self._mask.index_select(0, idx)[:, trim:]
        for st in self._rows:
            st.offset -= trim


def _trim_left(mask_BL: torch.Tensor, rows: list[_State], cache: Any) -> torch.Tensor:
    """Drop the padding columns no row of ``rows`` needs (after some rows were removed), from
    the mask and ``cache``; the rows' offsets follow."""
    trim = min(st.offset for st in rows)
    if trim:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
        for st in rows:
            st.offset -= trim
    return mask_BL[:, trim:]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros in front of the sequence axis (-2 for [B, H, L, d] caches, -1 for [B, L] masks)."""
    axis = -2 if t.ndim == 4 else -1
    missing = width - t.shape[axis]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[axis] = missing
    return torch.cat([t.new_zeros(shape), t], dim=axis)


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[str | Sequence[int]],
                   edits: Sequence[Sequence[Intervention | RowEdit]] | None = None, *,
                   max_new_tokens: int = 40, chat: bool = False, temperature: float = 0.0,
                   seed: int | None = None, batch_size: int | None = None) -> list[Generation]:
    """Continue every prompt, each with its own edits, batched; the new tokens of each.

    Args:
        prompts: texts (BOS prepended, or with ``chat`` one user message in the chat template)
            or ready token ids.
        edits: one list of Steer/Clamp/Scale/Ablate (or row edits) per prompt; None: no edits.
            For a chat, build them with ``positions="generated"`` to steer only the reply.
        max_new_tokens, temperature, seed: per row as in :class:`Row` (row i is seeded
            ``seed + i``).
        batch_size: at most this many rows generate at once (the next joins as one finishes);
            default all.

    Returns:
        One :class:`Generation` per prompt, in order: greedy by default, the same tokens as
        ``compare_generations(...).steered_ids`` for that prompt and edits.

    Example:
        >>> prompts = ["The city is"] * 3
        >>> edits = [[Steer(sae, [4154], s)] for s in (0.0, 40.0, 80.0)]
        >>> [g.text for g in generate_batch(model, tok, prompts, edits)]
    """

    if edits is not None and len(edits) != len(prompts):
        raise InputError(f"edits: {len(edits)} lists for {len(prompts)} prompts; give one per prompt")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    gen = BatchGenerator(model, tokenizer)
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise InputError(f"prompt {i} is empty", hint="give some text to continue")
            ids = prompt_ids(tokenizer, p, chat=chat)[0].tolist()
        else:
            ids = [int(t) for t in p]
        rows.append(Row(ids, list(edits[i]) if edits is not None else [], max_new_tokens,
                        temperature, seed=None if seed is None else seed + i))
    limit = batch_size or len(rows)
    handles: dict[int, int] = {}
    todo = list(enumerate(rows))
    finish: dict[int, str] = {}
    fired: dict[int, bool | None] = {}
    out: dict[int, list[int]] = {}
    while todo or gen.busy:
        while todo and gen.size < limit:
            i, row = todo.pop(0)
            handles[gen.add(row)] = i
        for t in gen.step():
            if t.token is not None:
                out.setdefault(handles[t.row], []).append(t.token)
            if t.finish:
                finish[handles[t.row]] = t.finish
                fired[handles[t.row]] = t.fired
    return [Generation(out[i], tokenizer.decode(out[i], skip_special_tokens=True), finish[i],
                       fired[i]) for i in range(len(rows))]
