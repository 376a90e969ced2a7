"""Which features steer: the output score (Arad, Mueller & Belinkov, EMNLP 2025) and ΔToken
Confidence (Wang, Hu, Wang & Zou, arXiv 2510.03659), for every feature of an SAE, batched.

Both come from one amplified forward per feature, on a neutral prompt (Arad et al.'s
``"From my experience,"``). For feature i with unit decoder direction d_i (model units):

1. Run the clean prompt; read the SAE's activations at its last position and take the
   largest one over all features, ``m = max_j f_j(x_last)``.
2. Add ``c · d_i`` to the SAE's output site at the last position only, with
   ``c = amplification · m`` (amplification 10, as in the authors' ``output_score.py``). This
   is their hook (feature i's activation raised by ``10 · m``, reconstruction plus error term
   kept) written as the vector it adds.
3. ``p_i`` = the next-token distribution after the last position; ``p`` = the clean one.

Then, with ``T_i`` = the top-k tokens of feature i's logit lens (k = 20, :mod:`.logit_lens`),
``V`` = vocabulary size and ``rank_p(t)`` = the 0-based position of token t when ``p`` is
sorted in decreasing order::

    output score            = (1 - min_{t∈T_i} rank_{p_i}(t) / V) · max_{t∈T_i} p_i(t)
    ΔToken Confidence       = max_t p_i(t) - max_t p(t)

The output score is exactly the authors' code (``rank_output_score * top_token_score``). The
ΔToken Confidence paper says it "measures how much amplifying a feature changes the next
token distribution"; its exact formula was not available to us, so this is our reading:
the change in the probability of the most likely next token (the model's "token
confidence") under the same amplification as the output score. It is positive when the
feature makes the model sure of what comes next (typically: of the tokens it promotes).

Cost: the prompt's prefix is run once; each feature then costs one token through the model
(its KV cache copied per batch), so all 4,608 demo features take one pass of 4,608 tokens.
The scores are saved as ``feature_scores.safetensors`` in a feature store folder.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from llamascope_sdk.base.atomic import atomic_save_safetensors
from llamascope_sdk.base.errors import CorruptCheckpointError, InputError
from llamascope_sdk.core.hooks import hooked
from llamascope_sdk.core.logit_lens import logit_lens
from llamascope_sdk.loading.compat import check_compatible
from llamascope_sdk.loading.models import check_fits_window, model_device, tokenize
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.steering.attachment import attach

SCORES_FILE = "feature_scores.safetensors"
#: Arad et al.'s neutral sentence for the output score.
OUTPUT_SCORE_PROMPT = "From my experience,"
#: Their ``amp_factor`` in output_score.py.
AMPLIFICATION = 10.0
#: Their ``--logit_lens_top_k`` default.
LENS_K = 20
#: What a score means, for tables, pages and JSON.
DEFINITIONS = {
    "output_score": "(1 - best rank of the feature's top-20 logit-lens tokens / vocab) x their "
                    "highest next-token probability, after adding 10 x (largest activation) "
                    "along the feature at the last token of 'From my experience,' "
                    "(Arad et al. 2025)",
    "delta_token_confidence": "change in the top next-token probability under the same "
                              "amplification (our reading of Wang et al. 2025's ΔToken "
                              "Confidence)",
}


@dataclass
class FeatureScores:
    """Per-feature selection scores, each [F] fp32, and how they were measured (``meta``)."""

    output_score: torch.Tensor
    delta_token_confidence: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(self.output_score.shape[0])

    def get(self, i: int) -> dict[str, float | int] | None:
        """Feature ``i``'s scores, its output-score rank (1 = best) among the ``scored``
        features; None if unscored."""
        os_ = float(self.output_score[i])
        if math.isnan(os_):
            return None
        rank = int((self.output_score.nan_to_num(nan=-math.inf) > os_).sum()) + 1
        return {"output_score": os_, "output_score_rank": rank,
                "scored": int((~torch.isnan(self.output_score)).sum()),
                "delta_token_confidence": float(self.delta_token_confidence[i])}

    def top(self, n: int, by: str = "output_score") -> list[int]:
        """The ``n`` features with the highest score ``by`` (output_score or
        delta_token_confidence), best first."""
        if by not in ("output_score", "delta_token_confidence"):
            raise InputError(f"score {by!r} is unknown; allowed are output_score and "
                             "delta_token_confidence")
        values: torch.Tensor = getattr(self, by)
        values = values.nan_to_num(nan=-math.inf)  # unscored features last
        return values.topk(min(n, int(torch.isfinite(values).sum()))).indices.tolist()

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/feature_scores.safetensors`` atomically; return its path."""
        path = Path(folder).expanduser() / SCORES_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"output_score": self.output_score.float().cpu(),
                                 "delta_token_confidence": self.delta_token_confidence.float().cpu()},
                                path, metadata={k: str(v) for k, v in self.meta.items()})
        return path

    @classmethod
    def load(cls, folder_or_file: str | Path) -> FeatureScores:
        """Read what :meth:`save` wrote (a store folder or the file itself).

        Raises:
            FileNotFoundError: no scores there. CorruptCheckpointError: unreadable or wrong shape.
        """
        from safetensors import safe_open

        p = Path(folder_or_file).expanduser()
        path = p / SCORES_FILE if p.is_dir() else p
        if not path.is_file():
            raise FileNotFoundError(f"no feature scores at {path}: compute them with "
                                    "`llamascope score-features --sae ... --store ...`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iter)
        except Exception as exc:  # safetensors raises its own error types
            raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
        need = ("output_score", "delta_token_confidence")
        if any(k not in t or t[k].ndim != 1 for k in need) or \
                t["output_score"].shape != t["delta_token_confidence"].shape:
            raise CorruptCheckpointError(f"{path}: expected 1-D tensors {list(need)} of one length")
        return cls(t["output_score"].float(), t["delta_token_confidence"].float(), meta)


def load_scores(folder: str | Path | None) -> FeatureScores | None:
    """The scores saved in a store ``folder``, or None when it has none (or no folder)."""
    if folder is None or not (Path(folder).expanduser() / SCORES_FILE).is_file():
        return None
    return FeatureScores.load(folder)


def cache_keyword(model: Any) -> str:
    """The name of the KV-cache argument (and output field) of ``model.forward``: ``cache``
    in transformers >= 5.2x, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def score_features(model: Any, tokenizer: Any, sae: SAE, *, prompt: str = OUTPUT_SCORE_PROMPT,
                   amplification: float = AMPLIFICATION, lens_k: int = LENS_K,
                   batch_size: int = 256, features: list[int] | None = None,
                   progress: bool = True) -> FeatureScores:
    """The output score and ΔToken Confidence of every feature (module docstring), batched.

    Args:
        prompt: the neutral prompt (BOS prepended); the edit is made at its last token.
        amplification: c = amplification x the largest SAE activation at the last token.
        lens_k: logit-lens tokens per feature for the output score.
        batch_size: features per forward.
        features: score only these (the others get NaN); default all.
        progress: a progress line on stderr.

    Raises:
        InputError: an empty prompt, or one where no feature fires at the last token.
    """

    if not prompt or not prompt.strip():
        raise InputError("the scoring prompt is empty", hint="give a short neutral prompt")
    if not (math.isfinite(amplification) and amplification > 0):
        raise InputError(f"amplification must be a positive number, got {amplification}")
    if batch_size < 1 or lens_k < 1:
        raise InputError(f"batch_size and lens_k must be at least 1, got {batch_size}, {lens_k}")
    _, site_out = check_compatible(model, sae)
    idx = (torch.arange(sae.d_sae) if features is None
           else sae.check_features(features).cpu())
    dev = model_device(model)
    ids = tokenize(tokenizer, prompt).to(dev)
    check_fits_window(model, ids.shape[1], what="the scoring prompt")
    if ids.shape[1] < 2:
        raise InputError(f"the scoring prompt {prompt!r} has no tokens after BOS")
    with torch.no_grad():
        with attach(model, [sae]) as h:
            clean = model(ids).logits[0, -1].float()
        m = float(h.features[sae.name][0, -1].float().max())
        if not m > 0:
            raise InputError(f"{sae.name}: no feature fires at the last token of {prompt!r}, so "
                             "there is nothing to scale the amplification by",
                             hint="use another neutral prompt")
        c = amplification * m
        p_clean_top = float(torch.softmax(clean, -1).max())
        lens = logit_lens(model, sae.W_dec[idx.to(sae.device)], k=lens_k).top_ids  # [n, k]
        kw = cache_keyword(model)
        out = model(ids[:, :-1], use_cache=True)
        prefix = getattr(out, kw)
        last = ids[:, -1:]
        out_score = torch.full((sae.d_sae,), math.nan)
        dtc = torch.full((sae.d_sae,), math.nan)
        bar = tqdm(total=idx.numel(), unit="feature", desc="scoring", file=sys.stderr,
                   disable=not progress, leave=False)
        for start in range(0, idx.numel(), batch_size):
            chunk = idx[start:start + batch_size]
            b = chunk.numel()
            add = (c * sae.W_dec[chunk.to(sae.device)].float())[:, None, :]  # [b, 1, D]

            def edit(y: torch.Tensor, add: torch.Tensor = add) -> torch.Tensor:
                return y + add.to(device=y.device, dtype=y.dtype)

            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(b)
            with hooked(model, {site_out: edit}):
                logits = model(last.expand(b, 1), use_cache=True,
                               **{kw: cache}).logits[:, -1].float()
            probs = torch.softmax(logits, -1)  # [b, V]
            toks = lens[start:start + b].to(probs.device)
            best = probs.gather(1, toks).max(1).values  # highest lens-token probability
            rank = (probs > best[:, None]).sum(1).float()  # its 0-based rank = the best rank
            out_score[chunk] = ((1 - rank / probs.shape[1]) * best).cpu()
            dtc[chunk] = (probs.max(1).values - p_clean_top).cpu()
            bar.update(b)
        bar.close()
    meta = {"prompt": prompt, "amplification": amplification, "lens_k": lens_k,
            "max_activation": m, "added_length": c, "sae": sae.name,
            "model": str(getattr(model, "name_or_path", "")),
            "clean_top_probability": p_clean_top, "method": "feature_scores v1"}
    return FeatureScores(out_score, dtc, meta)


__all__ = ["FeatureScores", "score_features", "load_scores", "SCORES_FILE", "DEFINITIONS",
           "OUTPUT_SCORE_PROMPT", "AMPLIFICATION", "LENS_K"]
