"""``eval``: reconstruction and downstream metrics of SAEs on a text, each explained."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from llamascope_sdk.cli.app import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    RevisionOpt,
    app,
    command,
    echo_json,
)

#: What each printed metric means (the table's third column).
EXPLAIN: dict[str, str] = {
    "n_tokens": "positions counted (BOS/EOS/pad excluded)",
    "n_sequences": "sequences the text was cut into",
    "context": "at most this many tokens per sequence (BOS included)",
    "l0_mean": "mean number of features firing per counted token",
    "explained_variance_centred": "1 - SSE / total variance around the mean (authors' code)",
    "explained_variance_uncentred": "1 - SSE / sum of squared norms (the paper's formula)",
    "mse": "mean squared error per element of the activation (model units squared)",
    "ce_clean": "next-token cross-entropy of the clean model (nats)",
    "ce_spliced": "the same with the reconstruction spliced in at the output site",
    "delta_lm_loss": "ce_spliced - ce_clean: the cost of replacing the site by the SAE",
    "kl_div": "KL(clean || spliced) of next-token distributions, nats per position",
    "n_dead": "features that never fired on these tokens",
    "frac_dead": "n_dead / d_sae",
    "n_dense": "features firing on more than 10% of tokens",
    "frac_dense": "n_dense / d_sae",
    "ce_zero_ablation": "cross-entropy with the output site zeroed",
    "loss_recovered": "(ce_zero - ce_spliced) / (ce_zero - ce_clean)",
    "n_excluded": "positions left out for an input norm above the cut-off",
}
#: What a metric that was not measured says instead of a bare None.
NOT_MEASURED: dict[str, str] = {
    "ce_zero_ablation": "not measured (add --zero-ablation)",
    "loss_recovered": "not measured (add --zero-ablation)",
    "exclude_norm_above": "no cut-off",
}


@app.command("eval")
@command
def eval_cmd(names: Annotated[list[str], typer.Argument(help="SAE names sharing one model pass.")],
             dataset: Annotated[str, typer.Option(help="A local .txt/.jsonl/.parquet file or a Hugging Face dataset name.")],
             tokens: Annotated[int, typer.Option(min=1, help="Tokens to evaluate on (BOS included).")] = 20_000,
             context: Annotated[int, typer.Option(min=2, help="Tokens per sequence: at most this many (exactly this many with --pack); up to the model's window.")] = 1024,
             pack: Annotated[bool, typer.Option(help="Join documents (EOS between them) and cut sequences of exactly --context tokens, instead of one sequence per document (a .txt file is split at ' = Title = ' headings, else at blank lines).")] = False,
             zero_ablation: Annotated[bool, typer.Option(help="Also run with the output site zeroed, for loss_recovered.")] = False,
             model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
             revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """L0, explained variance, MSE, delta LM loss, KL and dead/dense features on a text."""
    from llamascope_sdk.base.devices import resolve_device
    from llamascope_sdk.base.dist import init_from_env
    from llamascope_sdk.corpus import check_corpus
    from llamascope_sdk.evaluation.evaluate import evaluate
    from llamascope_sdk.loading.compat import check_compatible
    from llamascope_sdk.loading.models import base_model_of, load_model
    from llamascope_sdk.loading.sae import SAE

    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU a rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    resolve_device(device)
    check_corpus(dataset)  # a missing or unreadable file is reported before any loading
    dist = init_from_env(device)
    saes = [SAE.from_pretrained(n, revision=revision, device=device) for n in names]
    models = {base_model_of(s) for s in saes}
    if model is None and len(models) > 1:
        raise typer.BadParameter(f"the SAEs belong to different models {sorted(models)}; pass --model",
                                 param_hint="--model")
    lm, tok = load_model(model or models.pop(), device=device, dtype=dtype,
                         hidden_size=saes[0].d_model)
    for s in saes:
        check_compatible(lm, s)
    results = evaluate(lm, tok, saes, dataset, tokens=tokens, context=context, pack=pack,
                       zero_ablation=zero_ablation, progress=not as_json and dist.is_main)
    if not dist.is_main:  # every rank holds the same merged metrics; rank 0 prints them
        return
    out = {name: r.to_dict() for name, r in results.items()}
    if as_json:
        echo_json(out)
        return
    split = ("documents joined and cut into sequences of exactly" if pack else
             "one sequence per document, BOS + at most")
    for name, r in out.items():
        typer.echo(f"{name} on {dataset} ({split} {context} tokens): {r['n_sequences']} "
                   f"sequences, {r['n_tokens'] / max(1, r['n_sequences']):.0f} counted tokens each "
                   "on average")
        for k, v in r.items():
            if k in EXPLAIN or k in NOT_MEASURED:
                typer.echo(f"  {k:<29} {_shown(k, v):<12} {EXPLAIN.get(k, '')}".rstrip())


def _shown(key: str, value: Any) -> str:
    if value is None:
        return NOT_MEASURED.get(key, "n/a")
    return f"{value:.5g}" if isinstance(value, float) else str(value)
