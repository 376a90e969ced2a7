"""Activations for training: one LM pass feeds every requested site, stopping early.

``ActivationGenerator`` captures all sites (R/A/M/TC of several layers) at once through
:func:`llamascope_sdk.loading.capture.capture` (the capture mining and evaluation use too), which
ends the forward after the last site it needs, so
layers after it never run (spec section 4; peers 5.2 "one LM pass -> many SAEs", "early exit"). Positions holding
BOS/EOS/pad are dropped. ``LiveSource`` turns a :class:`~.data.TokenSource` into activation
chunks; :mod:`.cache` writes and reads the same chunks from disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from llamascope_sdk.core.sites import Site, module_for, parse_hook_point
from llamascope_sdk.corpus import pad_rows
from llamascope_sdk.loading.capture import capture, keep_mask, valid_mask
from llamascope_sdk.training.data import TokenSource

Chunk = dict[str, torch.Tensor]  # hook point -> [n, D]; plus "tokens"/"doc"/"pos" metadata


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
        for site in self.sites.values():
            module_for(model, site)  # a missing module is reported now, not mid-training

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> Chunk:
        """Activations at the kept positions of ``tokens`` [B, T] (row-major order).

        Returns a dict with one [n, D] tensor per hook point and ``tokens`` [n] (the token at
        each kept position), ``row`` [n] (batch row) and ``pos`` [n] (position in the row).
        """
        b, t = tokens.shape
        if lengths is None:
            lengths = torch.full((b,), t)
        valid = valid_mask(lengths, t)
        keep = keep_mask(tokens, valid, self.drop_ids)
        store, _ = capture(self.model, self.sites.values(), tokens, valid)
        flat = keep.reshape(-1).to(next(self.model.parameters()).device)
        out: Chunk = {n: store[self.sites[n]].reshape(b * t, -1)[flat].to(self.dtype).cpu()
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
