"""How well a transcoder set stands in for a model's MLPs when every one is replaced at once.

:func:`replacement_quality` runs three forwards per batch of token ids through the SDK's one
hook mechanism (:func:`~llamascope_sdk.core.hooks.hooked`):

* clean: the model as it is;
* replaced: at every layer with a transcoder, the MLP output is replaced by the transcoder's
  output computed from that same forward's (already replaced upstream) normalised MLP input:
  the replacement model of an attribution graph *without* error nodes;
* with error: the same, plus the error term ``mlp_out - transcoder(x)`` taken in that forward:
  the replacement model *with* error nodes, which must give the clean logits back (its largest
  logit difference is reported; it is rounding only).

Special positions (BOS/EOS/pad) keep their true MLP output in every pass, as in the recipe's
evaluation (and as circuit-tracer zeroes features at BOS). Losses are next-token cross-entropy
averaged over positions whose target is not special; KL is KL(clean || replaced) over the same
positions. Per-layer explained variance and single-layer delta loss come from
:func:`llamascope_sdk.evaluation.evaluate.evaluate`, which the build script calls beside this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamascope_sdk.core.hooks import SiteFn, hooked
from llamascope_sdk.core.sites import Site, parse_hook_point
from llamascope_sdk.loading.models import model_device
from llamascope_sdk.loading.sae import SAE


@dataclass(frozen=True)
class ReplacementQuality:
    """Cross-entropies (nats per token) of the clean and the all-MLPs-replaced model."""

    n_tokens: int
    n_layers_replaced: int
    ce_clean: float
    ce_replaced: float
    kl_replaced: float
    max_abs_logit_diff_with_error: float

    @property
    def delta_lm_loss(self) -> float:
        """ce_replaced - ce_clean: what replacing every MLP at once costs."""
        return self.ce_replaced - self.ce_clean

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta_lm_loss": self.delta_lm_loss}


def _sites(sae: SAE) -> tuple[Site, Site]:
    site_in = parse_hook_point(sae.hyperparams.hook_point_in)
    site_out = parse_hook_point(sae.hyperparams.hook_point_out)
    if site_in.kind != "ln2_normalized" or site_out.kind != "mlp_out" or site_in.layer != site_out.layer:
        raise ValueError(f"{sae.name}: not an MLP transcoder (reads {sae.hyperparams.hook_point_in}, "
                         f"writes {sae.hyperparams.hook_point_out}); allowed is "
                         "blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out")
    return site_in, site_out


def replacement_hooks(transcoders: Sequence[SAE], keep_BT: torch.Tensor, *,
                      with_error: bool) -> dict[Site, SiteFn]:
    """Hooks that replace each transcoder's MLP output at the ``keep_BT`` positions (with the
    error term added back when ``with_error``)."""
    hooks: dict[Site, SiteFn] = {}
    for sae in transcoders:
        site_in, site_out = _sites(sae)
        box: dict[str, torch.Tensor] = {}

        def read(x_BTD: torch.Tensor, box: dict[str, torch.Tensor] = box) -> None:
            box["x"] = x_BTD

        def write(y_BTD: torch.Tensor, box: dict[str, torch.Tensor] = box,
                  sae: SAE = sae) -> torch.Tensor:
            y_hat_BTD = sae(box.pop("x")).to(y_BTD.dtype)
            if with_error:
                y_hat_BTD = y_hat_BTD + (y_BTD - y_hat_BTD)
            return torch.where(keep_BT[..., None].to(y_BTD.device), y_hat_BTD, y_BTD)

        hooks[site_in], hooks[site_out] = read, write
    return hooks


def _logits(model: nn.Module, ids_BT: torch.Tensor,
            hooks: dict[Site, SiteFn] | None = None) -> torch.Tensor:
    with torch.no_grad(), hooked(model, hooks or {}):
        out = model(input_ids=ids_BT.to(model_device(model)), use_cache=False)
    return out.logits.float()


def _batch_sums(model: nn.Module, transcoders: Sequence[SAE], ids_BT: torch.Tensor,
                specials: torch.Tensor) -> tuple[int, float, float, float, float]:
    keep_BT = ~torch.isin(ids_BT, specials)
    clean = _logits(model, ids_BT)
    repl = _logits(model, ids_BT, replacement_hooks(transcoders, keep_BT, with_error=False))
    err = _logits(model, ids_BT, replacement_hooks(transcoders, keep_BT, with_error=True))
    target_N = ids_BT[:, 1:].reshape(-1).to(clean.device)
    counted_N = keep_BT[:, 1:].reshape(-1).to(clean.device)
    def predicted(logits_BTV: torch.Tensor) -> torch.Tensor:  # [N, V] rows whose target counts
        return logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1])[counted_N]

    lp_clean, lp_repl = predicted(clean).log_softmax(-1), predicted(repl).log_softmax(-1)
    tgt = target_N[counted_N]
    ce_clean = float(F.nll_loss(lp_clean, tgt, reduction="sum"))
    ce_repl = float(F.nll_loss(lp_repl, tgt, reduction="sum"))
    kl = float((lp_clean.exp() * (lp_clean - lp_repl)).sum())
    return int(counted_N.sum()), ce_clean, ce_repl, kl, float((err - clean).abs().max())


def replacement_quality(model: nn.Module, transcoders: Sequence[SAE], ids_BT: torch.Tensor,
                        special_ids: set[int], *, batch_size: int = 1) -> ReplacementQuality:
    """Clean vs all-replaced cross-entropy over the rows of ``ids_BT`` [B, T] (no padding).

    Raises:
        ValueError: a transcoder that is not an MLP transcoder, or two for one layer.
    """
    layers = [_sites(t)[0].layer for t in transcoders]
    if len(set(layers)) != len(layers):
        raise ValueError(f"two transcoders for one layer: layers {sorted(layers)}")
    specials = torch.tensor(sorted(special_ids), dtype=torch.long)
    n, ce_c, ce_r, kl, worst = 0, 0.0, 0.0, 0.0, 0.0
    for s in range(0, ids_BT.shape[0], batch_size):
        bn, bc, br, bk, bw = _batch_sums(model, transcoders, ids_BT[s:s + batch_size], specials)
        n, ce_c, ce_r, kl, worst = n + bn, ce_c + bc, ce_r + br, kl + bk, max(worst, bw)
    if n == 0:
        raise ValueError("replacement_quality: no non-special target token in ids_BT")
    return ReplacementQuality(n_tokens=n, n_layers_replaced=len(layers), ce_clean=ce_c / n,
                              ce_replaced=ce_r / n, kl_replaced=kl / n,
                              max_abs_logit_diff_with_error=worst)
