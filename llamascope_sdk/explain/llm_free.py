"""Output descriptions that need no LLM (Gur-Arieh et al., ACL 2025): VocabProj and TokenChange.

* **VocabProj**: the tokens the feature's decoder direction promotes and suppresses through
  the unembedding: the store's logit lens (:mod:`~llamascope_sdk.core.logit_lens`), read as is.
* **TokenChange**: the tokens whose next-token probability rises most when the feature is
  added. For each of :data:`PROMPTS`, the model runs once clean and once per feature with
  ``strength x typical activation`` times the feature's unit decoder direction added at the
  SAE's output site on every token but BOS (:class:`~llamascope_sdk.steering.interventions.Steer`'s
  math and coefficients, ``relative=True``); the change ``p_steered - p_clean`` of the
  distribution at the last position is averaged over the prompts and the ``k`` largest rises
  are kept. Features are batched: one forward per prompt and chunk of features, each row of
  the batch steered by its own feature. Features that never fired (no typical activation) get
  none.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.core.hooks import hooked
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.models import model_device, tokenize
from llamascope_sdk.steering.interventions import Steer
from llamascope_sdk.store import view
from llamascope_sdk.store.explanations import EXPLANATIONS, LLM_FREE, write_feature

PROMPTS = ("The", "In the beginning,", "She said that", "My favourite thing is",
           "The results show", "Once upon a time", "He walked into the", "It is important to")
METHOD = "llm-free-1"


def vocab_proj(store: Any, i: int) -> dict[str, list[str]] | None:
    lens = view.logit_lens(store, i)
    if lens is None:
        return None
    return {"promoted": [t for t, _ in lens["promoted"]], "suppressed": [t for t, _ in lens["suppressed"]]}


@torch.no_grad()
def token_change(model: Any, tokenizer: Any, sae: Any, features: Sequence[int], *,
                 strength: float = 4.0, k: int = 10, chunk: int = 32,
                 prompts: Sequence[str] = PROMPTS) -> dict[int, list[tuple[int, float]]]:
    """``{feature: [(token id, mean rise in probability), ...]}``, ``k`` per feature (module
    docstring). Needs ``sae.stats`` (typical activations)."""
    _, site = check_compatible(model, sae)
    typical = sae.stats.typical if sae.stats is not None else torch.zeros(sae.d_sae)
    live = [int(f) for f in features if float(typical[int(f)]) > 0]
    dev = model_device(model)
    total = {f: torch.zeros(0) for f in live}
    for start in range(0, len(live), chunk):
        part = live[start:start + chunk]
        alpha = Steer(sae, part, strength, relative=True).coefficients()  # [C] model units
        add_CD = (alpha[:, None] * sae.W_dec[torch.tensor(part, device=sae.W_dec.device)])
        rise = None
        for text in prompts:
            ids = tokenize(tokenizer, text).to(dev)
            p0 = model(ids).logits[0, -1].float().softmax(-1)

            def steer(y: torch.Tensor, add: torch.Tensor = add_CD) -> torch.Tensor:
                out = y.clone()
                out[:, 1:] += add[:, None, :].to(y)  # every token but BOS
                return out

            with hooked(model, {site: steer}):
                p1 = model(ids.expand(len(part), -1)).logits[:, -1].float().softmax(-1)
            d = (p1 - p0).cpu()
            rise = d if rise is None else rise + d
        assert rise is not None
        rise /= len(prompts)
        for row, f in enumerate(part):
            total[f] = rise[row]
        sys.stderr.write(f"TokenChange: {min(start + chunk, len(live))}/{len(live)} features\n")
    out: dict[int, list[tuple[int, float]]] = {}
    for f in live:
        v, idx = total[f].topk(min(k, total[f].numel()))
        out[f] = [(int(t), float(x)) for t, x in zip(idx.tolist(), v.tolist(), strict=True)]
    return out


def describe_outputs(store: Any, features: Sequence[int], *, model: Any = None,
                     tokenizer: Any = None, sae: Any = None, strength: float = 4.0, k: int = 10,
                     out: str | Path | None = None) -> Path:
    """Write VocabProj (and, given the model, tokenizer and SAE, TokenChange) of ``features``
    to ``explanations/llm-free/features/<i>.json``; return that folder."""
    folder = Path(out) if out is not None else Path(store.path) / EXPLANATIONS / LLM_FREE
    changes: dict[int, list[tuple[int, float]]] = {}
    if model is not None and sae is not None:
        if sae.stats is None:
            sae.stats = store.stats
        changes = token_change(model, tokenizer, sae, features, strength=strength, k=k)
    for i in features:
        rec: dict[str, Any] = {"feature": int(i), "sae": store.name, "method": METHOD,
                               "vocab_proj": vocab_proj(store, i), "token_change": None}
        if i in changes:
            rec["token_change"] = {
                "strength": strength, "prompts": list(PROMPTS),
                "tokens": [[tokenizer.decode([t]), round(d, 6)] for t, d in changes[i]]}
        write_feature(folder, int(i), rec)
    return folder
