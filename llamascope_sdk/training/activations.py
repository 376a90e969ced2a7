"""Activations for training: one LM pass feeds every requested site, stopping early.

``ActivationGenerator`` hooks all sites (R/A/M/TC of several layers) at once and raises
:class:`_StopForward` from the hook of the last module it needs, so layers after it never
run (spec section 4; peers 5.2 "one LM pass -> many SAEs", "early exit"). Positions holding
BOS/EOS/pad are dropped. ``LiveSource`` turns a :class:`~.data.TokenSource` into activation
chunks; :mod:`.cache` writes and reads the same chunks from disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from llamascope_sdk.sites import Site, module_for, parse_hook_point, read_activation

from .data import TokenSource, pad_rows

#: Order in which a decoder layer's hooked modules run.
_ORDER = {"attn_out": 0, "ln2_normalized": 1, "mlp_out": 2, "resid_post": 3}

Chunk = dict[str, torch.Tensor]  # hook point -> [n, D]; plus "tokens"/"doc"/"pos" metadata


class _StopForward(Exception):
    """Raised from the last needed hook; caught by the generator (early exit)."""


class ActivationGenerator:
    """Run the LM once per batch and collect the raw activations at several hook points.

    Args:
        model: a Llama-family transformers causal LM.
        hook_points: TransformerLens names (``blocks.15.hook_resid_post`` ...); duplicates are fine.
        drop_ids: token ids whose positions are dropped (BOS, EOS, pad).
        dtype: dtype of the returned activations.
    """

    def __init__(self, model: nn.Module, hook_points: list[str], drop_ids: set[int],
                 dtype: torch.dtype = torch.float32) -> None:
        self.model = model
        self.hook_points = list(dict.fromkeys(hook_points))
        self.sites: dict[str, Site] = {h: parse_hook_point(h) for h in self.hook_points}
        self.drop_ids = torch.tensor(sorted(drop_ids), dtype=torch.long)
        self.dtype = dtype
        last = max(self.sites.values(), key=lambda s: (s.layer, _ORDER[s.kind]))
        self._last = module_for(model, last)

    def _hooks(self, store: dict[str, torch.Tensor]) -> list[Any]:
        handles = []
        for name, site in self.sites.items():
            mod = module_for(self.model, site)

            def grab(m: nn.Module, args: tuple[Any, ...], output: Any = None, *, _n: str = name,
                     _s: Site = site) -> None:
                store[_n] = read_activation(_s, m, args, output).detach()

            if site.reads_input:
                handles.append(mod.register_forward_pre_hook(lambda m, a, g=grab: g(m, a)))
            else:
                handles.append(mod.register_forward_hook(lambda m, a, o, g=grab: g(m, a, o)))

        def stop(m: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:
            raise _StopForward

        # Registered last, so it runs after the grab hooks of the same module.
        last_is_pre = all(s.reads_input for s in self.sites.values()
                          if module_for(self.model, s) is self._last)
        handles.append(self._last.register_forward_pre_hook(lambda m, a: stop(m, a))
                       if last_is_pre else self._last.register_forward_hook(stop))
        return handles

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> Chunk:
        """Activations at the kept positions of ``tokens`` [B, T] (row-major order).

        Returns a dict with one [n, D] tensor per hook point and ``tokens`` [n] (the token at
        each kept position), ``row`` [n] (batch row) and ``pos`` [n] (position in the row).
        """
        dev = next(self.model.parameters()).device
        b, t = tokens.shape
        if lengths is None:
            lengths = torch.full((b,), t)
        valid = torch.arange(t)[None, :] < lengths[:, None]
        keep = valid & ~torch.isin(tokens, self.drop_ids)
        store: dict[str, torch.Tensor] = {}
        handles = self._hooks(store)
        try:
            self.model(input_ids=tokens.to(dev), attention_mask=valid.long().to(dev), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        flat = keep.reshape(-1).to(dev)
        out: Chunk = {n: store[n].reshape(b * t, -1)[flat].to(self.dtype).cpu()
                      for n in self.hook_points}
        rows, pos = keep.nonzero(as_tuple=True)
        out["tokens"] = tokens[keep].to(torch.int32)
        out["row"] = rows.to(torch.int32)
        out["pos"] = pos.to(torch.int32)
        return out


class LiveSource:
    """Activation chunks generated on the fly, one LM forward of ``store_batch_size`` documents
    per chunk. State is the token source's document position, so it resumes exactly."""

    def __init__(self, generator: ActivationGenerator, tokens: TokenSource, store_batch_size: int,
                 pad_id: int) -> None:
        self.generator, self.tokens = generator, tokens
        self.store_batch_size, self.pad_id = store_batch_size, pad_id

    def __iter__(self) -> Iterator[Chunk]:
        for docs, rows in self.tokens.batches(self.store_batch_size):
            lengths = torch.tensor([len(r) for r in rows])
            chunk = self.generator(pad_rows(rows, self.pad_id), lengths)
            meta = torch.tensor(docs, dtype=torch.int32)[chunk.pop("row").long()]
            chunk["doc"] = meta[:, 0].contiguous()
            chunk["pos"] = chunk["pos"] + meta[:, 1]  # index into [BOS] + document tokens
            yield chunk

    def state_dict(self) -> dict[str, Any]:
        return self.tokens.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens.load_state_dict(state)
