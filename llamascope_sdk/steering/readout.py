"""Feature readouts: chosen features of an SAE read at every position a row runs through.

A :class:`Readout` names features of one SAE, or asks for the ``top_k`` largest at each
position. It is read at the SAE's input site during the running (steered) forward, before the
edits at that site, exactly as :func:`~llamascope_sdk.steering.reading.read_features` and
``llamascope encode`` read it: the full-precision SAE activation of the activation there, zero
at special tokens (BOS, EOS, pad). Named features touch their encoder rows only; ``top_k``
encodes all features of the row's positions. Rows that read the same features of the same SAE
in one forward are read together (:meth:`Readout.read_rows`: one encode, one copy to the host).

:class:`~llamascope_sdk.steering.batch_generation.BatchGenerator` reads them for the rows that
carry them and hands each forward's values out with that forward's tokens
(:class:`ReadoutValues`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.sites import Site, parse_hook_point
from llamascope_sdk.loading.sae import SAE

#: the most features one readout may name, and the largest top_k
MAX_READOUT_FEATURES = 64


@dataclass
class ReadoutValues:
    """One readout at some positions of one row: ``values`` [T, n] (fp32); ``features`` [T, n]
    the feature of each value (the same row repeated for named features; per position for
    ``top_k``, largest first)."""

    values: torch.Tensor
    features: torch.Tensor


class Readout:
    """Features of ``sae`` to read: ``features`` (indices) or the ``top_k`` largest.

    Example:
        >>> Readout(sae, features=[4154, 1297])
        >>> Readout(sae, top_k=5)

    Raises:
        InputError: both or neither of ``features`` and ``top_k``; a bad index or k.
    """

    def __init__(self, sae: SAE, features: list[int] | None = None, *,
                 top_k: int | None = None, name: str | None = None) -> None:
        if not isinstance(sae, SAE):
            raise TypeError(f"Readout.sae must be an SAE, got {type(sae).__name__}")
        if (features is None) == (top_k is None):
            raise InputError("a readout names features or asks for top_k, exactly one of them")
        self.sae, self.name = sae, name or sae.name
        self.idx: torch.Tensor | None = None
        self.top_k: int | None = None
        if features is not None:
            idx = sae.check_features(features)
            if not 1 <= idx.numel() <= MAX_READOUT_FEATURES:
                raise InputError(f"a readout names 1 to {MAX_READOUT_FEATURES} features, got "
                                 f"{idx.numel()}")
            if sae.hyperparams.act_fn == "topk":
                raise InputError(f"{sae.name}: named readouts read encoder rows, which needs a "
                                 "threshold SAE (jumprelu/relu); use top_k")
            self.idx = idx
        else:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or \
                    not 1 <= top_k <= min(MAX_READOUT_FEATURES, sae.d_sae):
                raise InputError(f"readout top_k must be an integer in "
                                 f"1..{min(MAX_READOUT_FEATURES, sae.d_sae)}, got {top_k!r}")
            self.top_k = top_k
        self.site: Site = parse_hook_point(sae.hyperparams.hook_point_in)

    @property
    def key(self) -> tuple[int, tuple[int, ...] | int]:
        """Readouts with equal keys read the same values (one SAE, the same features or the
        same k): a batch reads them for all their rows at once (:meth:`read_rows`)."""
        what = tuple(self.idx.tolist()) if self.idx is not None else int(self.top_k or 0)
        return id(self.sae), what

    def read(self, x_TD: torch.Tensor, keep_T: torch.Tensor) -> ReadoutValues:
        """The readout at the positions of ``x_TD`` (the activation at :attr:`site`); zero at
        positions where ``keep_T`` is False."""
        values, features = self.read_rows(x_TD[None], keep_T[None])
        return ReadoutValues(values[0], features[0])

    def read_rows(self, x_GTD: torch.Tensor,
                  keep_GT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`read` for G rows at once: (values, features), each [G, T, n] on the CPU,
        copied from the device in one transfer each. Named features touch their encoder rows
        only."""
        x = x_GTD.to(self.sae.dtype)
        keep = keep_GT[..., None].to(x.device)
        if self.idx is not None:
            v = (self.sae.encode_features(x, self.idx).float() * keep).cpu()
            return v, self.idx.cpu().expand(*v.shape[:-1], -1)
        assert self.top_k is not None
        f = self.sae.encode(x).float() * keep
        top = torch.topk(f, self.top_k, dim=-1)
        return top.values.cpu(), top.indices.cpu()

    def __repr__(self) -> str:
        what = f"top_k={self.top_k}" if self.idx is None else f"features={self.idx.tolist()}"
        return f"Readout({self.name!r}, {what})"


__all__ = ["MAX_READOUT_FEATURES", "Readout", "ReadoutValues"]
