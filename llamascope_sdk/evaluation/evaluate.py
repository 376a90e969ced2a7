"""Running a model and SAEs over text: L0, MSE, EV, delta LM loss, KL, dead/dense features.

The protocol follows the authors' evals (spec section 5): documents get BOS prepended and are
truncated to ``context`` tokens; BOS/EOS/pad positions are excluded from every metric and left
clean when the reconstruction is spliced in at ``hook_point_out``; cross-entropy is averaged over
non-special targets. Per batch there is ONE clean forward that captures every SAE's input and
output sites, then one spliced forward per SAE (plus one zero-ablation forward per SAE when
asked). Reconstructions are computed from the clean input; for every Llama Scope position the
input site lies upstream of (or at) the output site, so this equals the spliced-run input. For
the same reason a spliced pass starts at the SAE's layer: the layers below it are replaced,
for that pass only, by a replay of their clean output (forward hooks a user put on those
layers therefore do not fire in spliced passes).

Generalisation checks (spec 5): ``context`` up to 8192 (the long-context check; needs a model
whose ``max_position_embeddings`` allows it, and documents that long, or ``pack=True``), and
any other model with the same hidden size, e.g. Llama-3.1-8B-Instruct with the base SAEs: just
pass that model (``--model`` in the CLI).

Hooks are placed with :func:`llamascope_sdk.core.hooks.hooked` (capture and replace functions);
the clean pass is :func:`llamascope_sdk.loading.capture.capture`, the one capture of the SDK.

Several processes (``torchrun``; gloo on CPU, nccl on GPU): every rank reads the same batches
and runs batches i with i % world == rank. Every sum is kept per batch (one row of a small
[batches, 9] table: squared error, squared norm, the three NLLs, KL and the counts) and added
in batch order at the end, after an ``all_reduce`` of the table (each row is non-zero on one
rank only, so the reduction is exact): every metric but one equals one process's, bit for bit.
The exception is the [D] sum of the outputs that the centred explained variance uses: it is
added across ranks in another order (float64, a relative difference of about 1e-16). Firing
counts and the L0 distribution (a histogram of per-token L0) are integers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamascope_sdk.base.dist import init_from_env
from llamascope_sdk.base.errors import IncompatibleModelError
from llamascope_sdk.base.jsonsafe import json_safe
from llamascope_sdk.core import metrics as M
from llamascope_sdk.core.hooks import SiteFn, hooked, replace_with
from llamascope_sdk.core.sites import (
    Site,
    decoder_layers,
    parse_hook_point,
)
from llamascope_sdk.corpus import check_corpus, iter_documents, tensor_batches, token_batches
from llamascope_sdk.loading.capture import capture
from llamascope_sdk.loading.compat import check_compatible, named_saes
from llamascope_sdk.loading.models import special_ids
from llamascope_sdk.loading.sae import SAE

#: The recipe's sequence length (spec 4): documents truncated to 1024 tokens.
DEFAULT_CONTEXT = 1024
#: Tokens per SAE encode/decode chunk: bounds the [tokens, d_sae] activation temporaries.
_ENCODE_CHUNK = 4096


@dataclass
class EvalResult:
    """Metrics of one SAE over one evaluation run. ``to_dict()`` is JSON-safe."""

    sae: str
    hook_point_in: str
    hook_point_out: str
    model: str
    n_tokens: int  # activation positions counted (non-special unless include_special)
    n_targets: int  # next-token targets counted for CE / KL
    n_sequences: int
    context: int
    include_special: bool
    l0_mean: float
    l0: dict[str, Any]  # mean, std, quantiles, histogram
    mse: float
    explained_variance_centred: float  # 1 - SSE / sum ||y - mean y||^2
    explained_variance_uncentred: float  # 1 - SSE / sum ||y||^2 (the paper's formula)
    ce_clean: float
    ce_spliced: float
    delta_lm_loss: float  # ce_spliced - ce_clean
    kl_div: float  # KL(clean || spliced), nats per counted position
    n_dead: int
    frac_dead: float
    n_dense: int
    frac_dense: float
    dense_threshold: float = M.DENSE_FREQUENCY
    ce_zero_ablation: float | None = None
    loss_recovered: float | None = None  # (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    exclude_norm_above: float | None = None  # input-norm cut-off (massive activations), if any
    n_excluded: int = 0  # non-special positions above it: left clean, not counted
    feature_frequency: torch.Tensor | None = field(default=None, repr=False)  # [F] float64

    def to_dict(self, *, frequencies: bool = False) -> dict[str, Any]:
        """Plain JSON types; non-finite floats become None. ``frequencies`` adds the [F] list."""
        d = asdict(self)
        freq = d.pop("feature_frequency")
        if frequencies and freq is not None:
            d["feature_frequency"] = [float(x) for x in freq]
        d["kl_direction"] = "KL(clean || spliced)"
        return json_safe(d)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(**kwargs), indent=2, sort_keys=True)

    def plot_frequencies(self, path: str | Path) -> Path:
        """Write the firing-frequency histogram as a PNG (needs matplotlib)."""
        if self.feature_frequency is None:
            raise ValueError(f"{self.sae}: no feature frequencies recorded")
        return M.plot_firing_histogram(self.feature_frequency, path, title=self.sae)


# ---------------------------------------------------------------------------- evaluation
#: The per-batch sums of :class:`_Running`, in the order of its table's columns.
_COLUMNS = ("sum_sq_err", "sum_sq_y", "nll_clean", "nll_spliced", "nll_zero", "kl", "n_targets",
            "n_excluded", "n_tokens")


@dataclass
class _Running:
    """Per-SAE sums: one row per batch (added in batch order at the end), plus [D]/[F] sums."""

    sae: SAE
    site_in: Site
    site_out: Site
    stats: M.ReconstructionStats
    rows: dict[int, list[float]] = field(default_factory=dict)
    l0_hist: torch.Tensor | None = None
    nll_clean: float = 0.0
    nll_spliced: float = 0.0
    nll_zero: float = 0.0
    kl: float = 0.0
    n_targets: int = 0
    n_excluded: int = 0

    def add_batch(self, i: int, b: M.ReconstructionStats, **sums: float) -> None:
        """Record batch ``i``: its reconstruction statistics ``b`` and its other sums."""
        self.rows[i] = [b.sum_sq_err, b.sum_sq_y, *(float(sums[k]) for k in _COLUMNS[2:-1]),
                        float(b.n_tokens)]
        st = self.stats
        if b.sum_y is not None and b.fire_counts is not None:
            if st.sum_y is None or st.fire_counts is None:
                st.sum_y, st.fire_counts = b.sum_y.clone(), b.fire_counts.clone()
            else:
                st.sum_y += b.sum_y
                st.fire_counts += b.fire_counts
        hist = torch.bincount(b.l0_all, minlength=self.sae.d_sae + 1)
        self.l0_hist = hist if self.l0_hist is None else self.l0_hist + hist

    def finish(self, n_batches: int, dist: Any) -> None:
        """Merge the ranks (``dist``: :class:`~llamascope_sdk.base.dist.Dist`) and add the
        rows in batch order."""
        table = torch.zeros(n_batches, len(_COLUMNS), dtype=torch.float64)
        for i, row in self.rows.items():
            table[i] = torch.tensor(row, dtype=torch.float64)
        st = self.stats
        dev = self.sae.device
        if st.sum_y is None or st.fire_counts is None:
            st.sum_y = torch.zeros(self.sae.d_model, dtype=torch.float64, device=dev)
            st.fire_counts = torch.zeros(self.sae.d_sae, dtype=torch.long, device=dev)
        hist = self.l0_hist if self.l0_hist is not None else torch.zeros(self.sae.d_sae + 1,
                                                                         dtype=torch.long)
        if dist.world > 1:
            table = dist.sum(table.to(dev)).cpu()
            st.sum_y, st.fire_counts = dist.sum(st.sum_y), dist.sum(st.fire_counts)
            hist = dist.sum(hist.to(dev)).cpu()
        total = [0.0] * len(_COLUMNS)
        for row in table.tolist():
            total = [t + v for t, v in zip(total, row, strict=True)]
        sums = dict(zip(_COLUMNS, total, strict=True))
        st.sum_sq_err, st.sum_sq_y, st.n_tokens = sums["sum_sq_err"], sums["sum_sq_y"], int(sums["n_tokens"])
        self.nll_clean, self.nll_spliced = sums["nll_clean"], sums["nll_spliced"]
        self.nll_zero, self.kl = sums["nll_zero"], sums["kl"]
        self.n_targets, self.n_excluded = int(sums["n_targets"]), int(sums["n_excluded"])
        # The per-token L0 values, as a sorted list (the same on every rank and for one process).
        st.l0_values = [torch.repeat_interleave(torch.arange(len(hist)), hist.cpu())]


def _check(model: nn.Module, named: Mapping[str, SAE], context: int) -> None:
    for name, sae in named.items():
        check_compatible(model, sae, name)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if max_pos is not None and context > max_pos:
        raise IncompatibleModelError(
            f"context={context} exceeds the model's max_position_embeddings={max_pos}; use "
            f"context <= {max_pos}, or a model with a longer window (Llama-3.1-8B: 131072)")


def _reconstruct(sae: SAE, x_ND: torch.Tensor, y_ND: torch.Tensor,
                 stats: M.ReconstructionStats) -> torch.Tensor:
    """y^ for the counted tokens, chunked so [tokens, d_sae] temporaries stay small."""
    out = torch.empty_like(y_ND)
    for i in range(0, x_ND.shape[0], _ENCODE_CHUNK):
        f = sae.encode(x_ND[i:i + _ENCODE_CHUNK])
        y_hat = sae.decode(f)
        stats.update(y_ND[i:i + _ENCODE_CHUNK], y_hat, f)
        out[i:i + _ENCODE_CHUNK] = y_hat.to(device=out.device, dtype=out.dtype)
    return out


class _Replay(nn.Module):
    """Stands in for the decoder layers before a spliced site: returns the clean output of the
    last skipped layer, so a spliced pass runs only the layers from the site on. Decoder
    layers return their hidden states as a plain tensor (transformers >= 4.56, the floor in
    pyproject.toml), which is what the replay returns."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.output


@contextmanager
def _skip_layers(model: nn.Module, n: int, output: Any) -> Iterator[None]:
    """Replace decoder layers [0, n) by a replay of layer n-1's clean output, then restore.

    The spliced site lies in layer n, so its upstream is unchanged and recomputing it would
    only repeat the clean pass (for a late-layer SAE that is most of the model).
    """
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(n)]
    replay = _Replay(output)
    try:
        for i in range(n):
            layers[i] = replay
        yield
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def _forward(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor,
             hooks: Mapping[Site, SiteFn | list[SiteFn]],
             resume: tuple[int, Any] | None = None) -> torch.Tensor:
    """Log-probs of one forward with ``hooks``; ``resume=(n, out)`` skips layers below n."""
    with hooked(model, hooks), (_skip_layers(model, *resume) if resume else nullcontext()):
        out = model(input_ids=ids, attention_mask=valid.long(), use_cache=False)
    return M.log_probs(out.logits)


def _masked_sum(v_BT: torch.Tensor, m_BT: torch.Tensor) -> float:
    return float((v_BT * m_BT).sum())


def _kept(count: torch.Tensor, x_BTD: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """``count`` without the positions whose input norm exceeds ``max_norm``."""
    if max_norm is None:
        return count
    return count & (x_BTD.float().norm(dim=-1) <= max_norm)


def _run_batch(i: int, model: nn.Module, ids: torch.Tensor, valid: torch.Tensor,
               count: torch.Tensor, runs: list[_Running], zero_ablation: bool,
               max_norm: float | None) -> None:
    """One clean pass, then one spliced pass per SAE; records batch ``i`` in each run."""
    sites = {s for r in runs for s in (r.site_in, r.site_out)}
    # The clean output of the layer before each spliced site, to resume the spliced pass there.
    sites |= {Site(r.site_out.layer - 1, "resid_post") for r in runs if r.site_out.layer > 0}
    acts, out = capture(model, sites, ids, valid, stop_after_last=False)
    log_p = M.log_probs(out.logits)
    del out
    nll_clean = M.nll_from_log_probs(log_p, ids)
    # KL(p || q) = sum p log p - sum p log q: the first term and p are shared by all SAEs,
    # so each SAE costs one dot product over the vocabulary, not an exp and a subtraction.
    p = log_p.exp()
    neg_entropy = torch.linalg.vecdot(p, log_p)
    for r in runs:
        keep = _kept(count, acts[r.site_in], max_norm)  # excluded positions stay clean
        tmask = keep[:, 1:].float()  # position t counts iff its target t+1 does
        y = acts[r.site_out]
        spliced = y.clone()
        b = M.ReconstructionStats(r.sae.d_model, r.sae.d_sae)
        spliced[keep] = _reconstruct(r.sae, acts[r.site_in][keep], y[keep], b)
        n = r.site_out.layer
        resume = (n, acts[Site(n - 1, "resid_post")]) if n > 0 else None
        log_q = _forward(model, ids, valid, {r.site_out: replace_with(spliced)}, resume)
        nll_spliced = _masked_sum(M.nll_from_log_probs(log_q, ids), tmask)
        kl = _masked_sum((neg_entropy - torch.linalg.vecdot(p, log_q))[:, :-1], tmask)
        del log_q
        nll_zero = 0.0
        if zero_ablation:
            spliced[keep] = 0
            log_z = _forward(model, ids, valid, {r.site_out: replace_with(spliced)}, resume)
            nll_zero = _masked_sum(M.nll_from_log_probs(log_z, ids), tmask)
        r.add_batch(i, b, nll_clean=_masked_sum(nll_clean, tmask), nll_spliced=nll_spliced,
                    nll_zero=nll_zero, kl=kl, n_targets=int(keep[:, 1:].sum()),
                    n_excluded=int((count & ~keep).sum()))


@torch.inference_mode()
def evaluate(model: nn.Module, tokenizer: Any,
             saes: SAE | Iterable[SAE] | Mapping[str, SAE],
             texts_or_dataset: str | os.PathLike[str] | Iterable[str] | torch.Tensor, *,
             tokens: int = 100_000, context: int | None = None, batch_size: int | None = None,
             include_special: bool = False, progress: bool = True, pack: bool = False,
             zero_ablation: bool = False, split: str = "train", text_field: str = "text",
             exclude_norm_above: float | None = None) -> dict[str, EvalResult]:
    """Evaluate SAEs on a model over text: L0, MSE, EV (centred and uncentred), delta LM loss,
    KL(clean || spliced), dead and dense features.

    Args:
        model, tokenizer: a Llama-family causal LM (any with the SAEs' hidden size: the
            Instruct model works with the base SAEs) and its tokenizer.
        saes: one SAE, several (their names key the result), or a ``{name: SAE}`` mapping.
            All share one clean forward per batch; each adds one spliced forward.
        texts_or_dataset: a .txt/.jsonl/.parquet path, a Hugging Face dataset name (streamed
            with ``datasets``; ``split`` and ``text_field`` pick the rows), an iterable of
            strings, or a LongTensor [B, T] of token ids used as given (no padding).
        tokens: at most this many tokens (BOS included) are fed to the model.
        context: at most this many tokens per sequence; default 1024 (the recipe's), capped
            at the model's window. Up to 8192 for the long-context check; a value beyond the
            model's ``max_position_embeddings`` is an error.
        batch_size: sequences per forward; default ``max(1, 2048 // context)``.
        include_special: also count BOS/EOS/pad positions and splice there (default: no, as
            in the recipe: special positions are excluded and left clean).
        progress: show a tqdm bar over tokens.
        pack: join documents (EOS-separated) and cut sequences of exactly ``context`` tokens.
        zero_ablation: also run the output site zeroed, giving ``ce_zero_ablation`` and
            ``loss_recovered`` (one more forward per SAE).
        exclude_norm_above: positions whose SAE input has an L2 norm above this (massive
            activations: SmolLM2 gives one token a norm of ~7,000 against a mean of ~170) are
            treated like special tokens: left clean in the spliced pass and left out of every
            metric, CE and KL included. Their number is ``EvalResult.n_excluded``.

    Returns:
        ``{sae name: EvalResult}``.

    Raises:
        IncompatibleModelError: wrong hidden size, missing layer, or context longer than the
            model's ``max_position_embeddings``.

    Example:
        >>> model, tok = load_model("meta-llama/Llama-3.1-8B", device="cuda")
        >>> res = evaluate(model, tok, [SAE.from_pretrained("L15R-8x")], "corpus.txt",
        ...                tokens=50_000)
        >>> res["L15R-8x"].to_dict()["delta_lm_loss"]
    """
    named = named_saes(saes)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    context = context or min(DEFAULT_CONTEXT, max_pos or DEFAULT_CONTEXT)
    _check(model, named, context)

    check_corpus(texts_or_dataset)  # a missing file is one line, before any forward (paths only)
    batch_size = batch_size or max(1, 2048 // context)
    device = next(model.parameters()).device
    runs = [_Running(sae, parse_hook_point(sae.hyperparams.hook_point_in),
                     parse_hook_point(sae.hyperparams.hook_point_out),
                     M.ReconstructionStats(sae.d_model, sae.d_sae)) for sae in named.values()]
    specials = torch.tensor(sorted(special_ids(tokenizer)), dtype=torch.long, device=device)
    if isinstance(texts_or_dataset, torch.Tensor):
        batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = tensor_batches(
            texts_or_dataset, tokens, context, batch_size)
    else:
        docs = iter_documents(texts_or_dataset, split=split, text_field=text_field)
        batches = token_batches(tokenizer, docs, tokens=tokens, context=context,
                                batch_size=batch_size, pack=pack)
    from tqdm.auto import tqdm


    dist = init_from_env(device.type)
    n_seq, n_batches = 0, 0
    with tqdm(total=tokens, unit="tok", disable=not progress or not dist.is_main,
              desc="evaluate") as bar:
        for i, (ids, valid) in enumerate(batches):
            n_seq, n_batches = n_seq + ids.shape[0], i + 1
            bar.update(int(valid.sum()))
            if i % dist.world != dist.rank:
                continue
            ids, valid = ids.to(device), valid.to(device)
            count = valid if include_special else valid & ~torch.isin(ids, specials)
            _run_batch(i, model, ids, valid, count, runs, zero_ablation, exclude_norm_above)
    for r in runs:
        r.finish(n_batches, dist)
    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
    return {key: _result(key, r, name, n_seq, context, include_special, zero_ablation,
                         exclude_norm_above) for key, r in zip(named, runs, strict=True)}


def _result(key: str, r: _Running, model_name: str, n_seq: int, context: int,
            include_special: bool, zero_ablation: bool, max_norm: float | None) -> EvalResult:
    st = r.stats
    nt = max(1, r.n_targets)
    ce_clean, ce_spliced = r.nll_clean / nt, r.nll_spliced / nt
    counts = st.fire_counts if st.fire_counts is not None else torch.zeros(r.sae.d_sae, dtype=torch.long)
    n_tok = max(1, st.n_tokens)
    n_dead = int(M.dead_features(counts).numel())
    n_dense = int(M.dense_features(counts, n_tok).numel())
    l0 = M.l0_summary(st.l0_all)
    ce_zero = r.nll_zero / nt if zero_ablation else None
    recovered = None
    if ce_zero is not None and ce_zero != ce_clean:
        recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    return EvalResult(
        sae=key, hook_point_in=r.site_in.hook_point, hook_point_out=r.site_out.hook_point,
        model=model_name, n_tokens=st.n_tokens, n_targets=r.n_targets, n_sequences=n_seq,
        context=context, include_special=include_special, l0_mean=float(l0["mean"]),  # type: ignore[arg-type]
        l0=l0,
        mse=st.mse, explained_variance_centred=st.ev_centred,
        explained_variance_uncentred=st.ev_uncentred, ce_clean=ce_clean, ce_spliced=ce_spliced,
        delta_lm_loss=ce_spliced - ce_clean, kl_div=r.kl / nt, n_dead=n_dead,
        frac_dead=n_dead / r.sae.d_sae, n_dense=n_dense, frac_dense=n_dense / r.sae.d_sae,
        ce_zero_ablation=ce_zero, loss_recovered=recovered, n_excluded=r.n_excluded,
        exclude_norm_above=max_norm,
        feature_frequency=M.firing_frequency(counts.cpu(), n_tok))
