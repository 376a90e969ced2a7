"""Store format 4's encoding of example windows and integer arrays: lossless, smaller on disk.

Format 3 wrote every example's window twice over: its token ids [n, W] int32, although the
windows of one feature and of different features cover the same corpus positions many times,
and its activations [n, W] float32, although a feature is zero on most of its window (on the
demo store, 92% of the top examples' window entries and 96% of the sample's). Format 4 keeps
the same information in:

* a **token table**: one token id per (document, position) that some window covers
  (``table_doc``, ``table_pos``, ``table_token``, sorted), the id most windows show there;
  ``lo``/``hi`` [n], the part of each window inside its sequence (ids outside are -1); and
  ``fix_row``/``fix_col``/``fix_token``, every window entry that differs from the table (a
  sequence's BOS at the position where the sequence before it has a document token);
* **sparse activations**: ``act_count`` [n] non-zero entries per window, then their columns
  ``act_col`` and values ``act_value`` (float32, unchanged), row after row;
* ``values`` only where it is not the window's centre activation (never, for mined stores);
* every integer array in the **narrowest signed type** that holds its values (:func:`narrow`);
  readers widen them to int64.

:func:`encode_examples` checks that :func:`decode_examples` gives back exactly its input
before anything is written; the windows in memory (:class:`~llamascope_sdk.mining.slots.Examples`)
are the same as before.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llamascope_sdk.base.errors import CorruptCheckpointError
from llamascope_sdk.mining.slots import Examples

__all__ = ["EXAMPLE_KEYS", "decode_examples", "encode_examples", "narrow", "widen"]

#: Tensors of a format-4 examples file (``values`` is optional).
EXAMPLE_KEYS = ("width", "indptr", "doc", "pos", "lo", "hi", "table_doc", "table_pos", "table_token",
                "fix_row", "fix_col", "fix_token", "act_count", "act_col", "act_value")
_INTS = (torch.int8, torch.int16, torch.int32, torch.int64)


def narrow(t: torch.Tensor) -> torch.Tensor:
    """An integer tensor in the narrowest signed dtype (int8 .. int64) that holds its values."""
    if t.numel() == 0:
        return t.to(torch.int8)
    lo, hi = int(t.min()), int(t.max())
    for dtype in _INTS:
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return t.to(dtype)
    raise AssertionError("unreachable: int64 holds every integer tensor")


def widen(path: Path, t: dict[str, torch.Tensor], names: tuple[str, ...]) -> None:
    """Widen the integer tensors ``names`` of ``t`` to int64 in place; refuse other dtypes."""
    for name in names:
        if t[name].dtype not in _INTS and t[name].dtype != torch.uint8:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} is {t[name].dtype}, expected "
                                         "an integer type")
        t[name] = t[name].long()


def _keys(doc: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
    """One int64 per (document, position): ``doc * span + pos`` (``0 <= pos < span``)."""
    return doc * span + pos


def _span(*pos: torch.Tensor) -> int:
    top = max((int(p.max()) for p in pos if p.numel()), default=0)
    return top + 1


def _window_positions(e: Examples) -> tuple[torch.Tensor, torch.Tensor]:
    """Document and position of every window entry: ``(doc [n, W], pos [n, W])``."""
    p = e.pos[:, None] - e.center + torch.arange(e.width)
    return e.doc[:, None].expand_as(p), p


def encode_examples(e: Examples) -> dict[str, torch.Tensor]:
    """The tensors of a format-4 examples file for ``e`` (checked to decode to ``e`` exactly).

    Raises:
        ValueError: a window whose in-sequence part is not one contiguous run, or a negative
            position inside a sequence (never from mining; a store built by hand).
    """
    n, w = e.tokens.shape
    inside = e.tokens >= 0
    lo = torch.where(inside.any(1), inside.int().argmax(1), torch.zeros(n, dtype=torch.long))
    hi = torch.where(inside.any(1), w - inside.flip(1).int().argmax(1),
                     torch.zeros(n, dtype=torch.long))
    run = (torch.arange(w) >= lo[:, None]) & (torch.arange(w) < hi[:, None])
    if not torch.equal(run, inside):
        raise ValueError("an example window's tokens inside its sequence are not one run")
    doc, pos = _window_positions(e)
    d, p, tok = doc[inside], pos[inside], e.tokens[inside].long()
    if p.numel() and int(p.min()) < 0:
        raise ValueError("an example window reaches a negative position inside its sequence")
    span = _span(p)
    if d.numel() and int(d.max()) >= 2**62 // span:
        raise ValueError("document indices too large for the token table's keys")
    table = _token_table(_keys(d, p, span), tok)
    fix = tok != table[1][torch.searchsorted(table[0], _keys(d, p, span))]
    rows, cols = inside.nonzero(as_tuple=True)
    nz = e.acts != 0
    arow, acol = nz.nonzero(as_tuple=True)
    out = {"width": torch.tensor([w]), "indptr": e.indptr.long(), "doc": e.doc.long(),
           "pos": e.pos.long(), "lo": lo, "hi": hi,
           "table_doc": table[0] // span, "table_pos": table[0] % span, "table_token": table[1],
           "fix_row": rows[fix], "fix_col": cols[fix], "fix_token": tok[fix],
           "act_count": nz.sum(1), "act_col": acol}
    out = {k: narrow(v) for k, v in out.items()}
    out["act_value"] = e.acts[arow, acol].float().contiguous()
    if n and not torch.equal(e.values.float(), e.acts[:, e.center].float()):
        out["values"] = e.values.float()
    back = decode_examples(Path("<encoded>"), dict(out), e.d_sae, e.center)
    if not (torch.equal(back.tokens, e.tokens.long()) and torch.equal(back.acts, e.acts.float())
            and torch.equal(back.values, e.values.float())):
        raise AssertionError("format-4 encoding does not give the examples back")
    return out


def _token_table(key: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique keys, the token id most entries show at each key; ties: the smallest)."""
    o = torch.argsort(key, stable=True)
    ks, ts = key[o], tok[o]
    first = torch.ones(len(ks), dtype=torch.bool)
    first[1:] = ks[1:] != ks[:-1]
    keys, best = ks[first], ts[first].clone()
    differs = torch.zeros(len(ks), dtype=torch.bool)
    differs[1:] = (ts[1:] != ts[:-1]) & ~first[1:]
    if bool(differs.any()):  # rare (a BOS where another sequence has a document token)
        some = torch.isin(ks, ks[differs])
        pairs, count = torch.unique(torch.stack([ks[some], ts[some]], 1), dim=0,
                                    return_counts=True)  # sorted by key, then token
        o = torch.argsort(count, descending=True, stable=True)
        o = o[torch.argsort(pairs[o, 0], stable=True)]
        top = torch.ones(len(o), dtype=torch.bool)
        top[1:] = pairs[o[1:], 0] != pairs[o[:-1], 0]
        won = pairs[o[top]]
        best[torch.searchsorted(keys, won[:, 0].contiguous())] = won[:, 1]
    return keys, best


def decode_examples(path: Path, t: dict[str, torch.Tensor], f: int, center: int) -> Examples:
    """Examples from the tensors ``t`` of format-4 file ``path`` (``center``: the window
    index of the centre token), checked: a file that does not describe one set of windows is
    one line naming it."""
    widen(path, t, tuple(k for k in EXAMPLE_KEYS if k != "act_value"))
    n, w = t["doc"].numel(), int(t["width"][0]) if t["width"].numel() == 1 else -1
    if not 0 <= center < w:
        raise CorruptCheckpointError(f"{path}: the window centre {center} does not fit its "
                                     f"windows (width {t['width'].tolist()})")
    _check(path, t, f, n, w)
    tokens = _window_tokens(path, t, center, w)
    acts = torch.zeros(n, w, dtype=torch.float32)
    acts[torch.repeat_interleave(torch.arange(n), t["act_count"]), t["act_col"]] = \
        t["act_value"].float()
    values = t["values"].float() if "values" in t else acts[:, center].clone()
    return Examples(t["indptr"], values, t["doc"], t["pos"], tokens, acts, center)


def _window_tokens(path: Path, t: dict[str, torch.Tensor], center: int, w: int) -> torch.Tensor:
    """[n, W] token ids of the windows: table look-ups, -1 outside ``lo:hi``, then the fixes.

    The table holds every covered position once, sorted, so a window's run is consecutive in
    it: one search per window finds its first entry, and the run is in the table exactly
    when the entry ``hi - lo - 1`` further on has the run's last key (keys are distinct
    integers, rising)."""
    col = torch.arange(w)
    lo, hi = t["lo"], t["hi"]
    full = hi > lo
    first = t["pos"] - center + lo
    span = _span(t["table_pos"], first[full], (first + hi - lo - 1)[full])
    table_key = _keys(t["table_doc"], t["table_pos"], span)
    start_key = _keys(t["doc"], first, span)
    last = table_key.numel() - 1
    start = torch.searchsorted(table_key, start_key).clamp(max=max(last, 0))
    end = (start + hi - lo - 1).clamp(0, max(last, 0))
    if bool(full.any()) and (last < 0 or int(first[full].min()) < 0
                             or not torch.equal(table_key[start[full]], start_key[full])
                             or not torch.equal(table_key[end[full]], (start_key + hi - lo - 1)[full])):
        raise CorruptCheckpointError(f"{path}: the token table lacks positions that the windows "
                                     "cover")
    # The table padded by W on both sides: row r's window is the W entries from start - lo + W
    # (rows of the table's sliding windows, a view: one row copy per example, no clamp).
    pad = torch.full((w,), -1, dtype=torch.long)
    table = torch.cat([pad, t["table_token"], pad])
    tokens = table.unfold(0, w, 1).index_select(0, start - lo + w)
    cut = ((lo > 0) | (hi < w)).nonzero().squeeze(1)  # rows with entries outside the sequence
    sub = tokens.index_select(0, cut)
    sub.masked_fill_((col < lo[cut, None]) | (col >= hi[cut, None]), -1)
    tokens.index_copy_(0, cut, sub)
    tokens[t["fix_row"], t["fix_col"]] = t["fix_token"]
    return tokens


def _check(path: Path, t: dict[str, torch.Tensor], f: int, n: int, w: int) -> None:
    """Refuse tensors that do not fit together (lengths, ranges), naming the first problem."""
    sizes = {"indptr": f + 1, "pos": n, "lo": n, "hi": n, "act_count": n,
             "table_pos": t["table_doc"].numel(), "table_token": t["table_doc"].numel(),
             "fix_col": t["fix_row"].numel(), "fix_token": t["fix_row"].numel(),
             "act_col": int(t["act_count"].sum()), "act_value": int(t["act_count"].sum())}
    if "values" in t:
        sizes["values"] = n
    for name, size in sizes.items():
        if t[name].dim() != 1 or t[name].numel() != size:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has shape "
                                         f"{list(t[name].shape)}, expected [{size}]")
    ptr = t["indptr"]
    bad = [
        (int(ptr[0]) != 0 or int(ptr[-1]) != n or bool((ptr[1:] < ptr[:-1]).any()),
         f"indptr is not a rising index from 0 to {n}"),
        (bool(((t["lo"] < 0) | (t["lo"] > t["hi"]) | (t["hi"] > w)).any()),
         f"lo/hi are not ranges inside the {w}-token windows"),
        (bool(((t["act_count"] < 0) | (t["act_count"] > w)).any())
         or bool(((t["act_col"] < 0) | (t["act_col"] >= w)).any())
         or bool(((t["fix_col"] < 0) | (t["fix_col"] >= w)).any())
         or bool(((t["fix_row"] < 0) | (t["fix_row"] >= n)).any()),
         f"activation or fix entries outside the {n} x {w} windows"),
        (t["table_pos"].numel() > 0 and int(t["table_pos"].min()) < 0, "a negative table position"),
    ]
    for is_bad, what in bad:
        if is_bad:
            raise CorruptCheckpointError(f"{path}: {what}")
