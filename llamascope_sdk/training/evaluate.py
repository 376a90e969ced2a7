"""Held-out evaluation of an exported SAE: L0, explained variance, delta LM loss (spec 5).

Explained variance is reported both ways (spec 5, 7.4):
- centred (the authors' code): 1 - sum ||y - y^||^2 / sum ||y - mean(y)||^2
- uncentred (the paper's formula): 1 - sum ||y - y^||^2 / sum ||y||^2
both summed over all non-special tokens. Delta LM loss splices the reconstruction at
``hook_point_out`` for non-special positions only (BOS/EOS/pad keep their clean activations)
and averages next-token CE over non-special targets.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from llamascope_sdk.sae import SAE
from llamascope_sdk.sites import first, module_for, parse_hook_point, read_activation, replace_first


@torch.no_grad()
def evaluate(model: Any, sae: SAE, tokens: torch.Tensor, lengths: torch.Tensor,
             special: set[int], batch_rows: int = 4,
             max_norm: float | None = None) -> dict[str, float]:
    """Metrics of ``sae`` on token rows [N, T] (right-padded; ``lengths`` valid per row).

    ``max_norm``: positions whose input norm exceeds it (massive activations, e.g. SmolLM2's
    first token after BOS, which can reach 40x the mean norm) are treated like special tokens:
    left clean and excluded from the metrics. The count is reported as "excluded".
    """
    site_in = parse_hook_point(sae.hyperparams.hook_point_in)
    site_out = parse_hook_point(sae.hyperparams.hook_point_out)
    mod_in, mod_out = module_for(model, site_in), module_for(model, site_out)
    tot = {"err": 0.0, "sq": 0.0, "sum": None, "n": 0.0, "l0": 0.0, "ce_clean": 0.0,
           "ce_sae": 0.0, "n_ce": 0.0}
    sq_c = 0.0
    ys: list[torch.Tensor] = []
    errs: list[torch.Tensor] = []
    for s in range(0, tokens.shape[0], batch_rows):
        tok, ln = tokens[s:s + batch_rows], lengths[s:s + batch_rows]
        t = tok.shape[1]
        valid = torch.arange(t)[None] < ln[:, None]
        keep = valid & ~torch.isin(tok, torch.tensor(sorted(special)))
        logits_clean = model(input_ids=tok, attention_mask=valid.long(), use_cache=False).logits
        grabbed: dict[str, torch.Tensor] = {}

        def read_in(m: Any, args: Any, out: Any = None) -> None:
            grabbed["x"] = read_activation(site_in, m, args, out)  # noqa: B023
            if max_norm is not None:
                big = grabbed["x"].float().norm(dim=-1) > max_norm  # noqa: B023
                grabbed["excluded"] = (big & keep).sum()  # noqa: B023
                keep.mul_(~big)  # noqa: B023

        def splice(m: Any, args: Any, out: Any) -> Any:
            y = first(out)
            f = sae.encode(grabbed["x"].float())  # noqa: B023
            y_hat = sae.decode(f).to(y.dtype)
            grabbed["y"], grabbed["y_hat"], grabbed["l0"] = y, y_hat, (f > 0).sum(-1)  # noqa: B023
            return replace_first(out, torch.where(keep[..., None], y_hat, y))  # noqa: B023

        h1 = (mod_in.register_forward_pre_hook(lambda m, a: read_in(m, a)) if site_in.reads_input
              else mod_in.register_forward_hook(read_in))
        h2 = mod_out.register_forward_hook(splice)
        try:
            logits_sae = model(input_ids=tok, attention_mask=valid.long(), use_cache=False).logits
        finally:
            h1.remove()
            h2.remove()
        y, y_hat = grabbed["y"][keep].float(), grabbed["y_hat"][keep].float()
        ys.append(y)
        errs.append((y - y_hat).pow(2).sum(-1))
        tot["l0"] += float(grabbed["l0"][keep].sum())
        tot["n"] += float(keep.sum())
        tot["excluded"] = tot.get("excluded", 0.0) + float(grabbed.get("excluded", 0))
        tgt_keep = keep[:, 1:]
        tgt = tok[:, 1:][tgt_keep]
        for key, lg in (("ce_clean", logits_clean), ("ce_sae", logits_sae)):
            tot[key] += float(F.cross_entropy(lg[:, :-1][tgt_keep].float(), tgt, reduction="sum"))
        tot["n_ce"] += float(tgt_keep.sum())
    y_all, err = torch.cat(ys), float(torch.cat(errs).sum())
    sq_c = float((y_all - y_all.mean(0)).pow(2).sum())
    sq = float(y_all.pow(2).sum())
    ce_c, ce_s = tot["ce_clean"] / tot["n_ce"], tot["ce_sae"] / tot["n_ce"]
    return {"tokens": int(tot["n"]), "excluded": int(tot.get("excluded", 0)), "L0": tot["l0"] / tot["n"], "EV (centred)": 1 - err / sq_c,
            "EV (uncentred)": 1 - err / sq, "MSE (raw, per element)": err / y_all.numel(),
            "CE clean": ce_c, "CE with SAE": ce_s, "delta LM loss": ce_s - ce_c}
