"""Mining features: ``inspect`` mines a corpus into a feature store with HTML pages (``show``
and ``search``, which read stores, are in :mod:`.read`)."""

from __future__ import annotations

import os
from pathlib import Path
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
    load_sae_and_model,
    say,
)

FeaturesOpt = Annotated[list[int] | None, typer.Option(
    "--features", "--feature", "-f", help="Features to write pages for; repeat for several. "
    "Every feature is mined either way. [default: labelled features, then the most frequent, "
    "up to --max-pages]", show_default=False)]

SaesOpt = Annotated[list[str], typer.Option(
    "--sae", "-s", help="SAE: a Llama Scope name, a local folder, or 'demo'. Repeat for several: "
    "they share one model pass, and each gets its own store OUT/<name>.")]


@app.command()
@command
def inspect(sae: SaesOpt,
            dataset: Annotated[str, typer.Option("--dataset", "-d", help="A .txt/.jsonl/.parquet file (comma-separated for several) or a Hugging Face dataset name.")],
            tokens: Annotated[int, typer.Option("--tokens", "-t", min=1, help="Tokens to read (BOS included).")] = 100_000,
            features: FeaturesOpt = None,
            out: Annotated[Path | None, typer.Option("--out", "-o", help="Store folder to write. [default: $LLAMASCOPE_CACHE/features/<sae>]", show_default=False)] = None,
            context: Annotated[int, typer.Option(min=2, help="Tokens per sequence: every document is read whole, in consecutive windows of BOS + context-1 tokens (positions count from the document's start).")] = 256,
            batch_size: Annotated[int, typer.Option(min=1, help="Sequences per forward.")] = 8,
            top_n: Annotated[int, typer.Option(min=1, help="Top examples kept per feature.")] = 20,
            samples: Annotated[int, typer.Option(min=0, help="Firings sampled per feature (uniformly), cut into --deciles activation bands: the decile examples explanation uses (delphi: 10 per decile).")] = 100,
            deciles: Annotated[int, typer.Option(min=1, help="Activation bands the sample is cut into.")] = 10,
            example_context: Annotated[int, typer.Option(min=1, help="Tokens of context of a decile or non-activating example (3/4 before the token).")] = 64,
            non_activating: Annotated[int, typer.Option("--non-activating", min=0, help="Random contexts kept per feature where it does not fire.")] = 100,
            non_activating_pool: Annotated[int, typer.Option("--non-activating-pool", min=0, help="Random contexts of the corpus the non-activating examples are drawn from (one bit per feature each).")] = 1000,
            checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every", min=1, help="Save the mining state every this many tokens; the same command run again resumes from the last save.", show_default=False)] = None,
            checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir", help="Where --checkpoint-every saves (with several nodes: a shared file system). [default: $LLAMASCOPE_CACHE/mining-checkpoints/<hash of the run>]", show_default=False)] = None,
            pages: Annotated[bool, typer.Option(help="Write HTML pages under OUT/pages.")] = True,
            max_pages: Annotated[int, typer.Option(min=0, help="At most this many feature pages.")] = 1000,
            save_stats_to: Annotated[Path | None, typer.Option("--save-stats-to", help="Also write feature_stats.safetensors into this folder (e.g. the SAE's own local folder, so that `steer --relative` finds it).", show_default=False)] = None,
            split: Annotated[str, typer.Option(help="Split of a Hugging Face dataset.")] = "train",
            text_field: Annotated[str, typer.Option(help="Text column/field of .jsonl/.parquet/HF data.")] = "text",
            model: ModelOpt = None, device: DeviceOpt = "cpu", dtype: DtypeOpt = None,
            revision: RevisionOpt = None, as_json: JsonOpt = False) -> None:
    """Mine every feature of an SAE on a corpus: top examples, quantile samples, statistics,
    histogram and logit lens, written to a feature store with HTML pages (progress on stderr).

    Relative steering then works with the mined statistics: pass --save-stats-to the SAE's
    folder, or in Python: sae.stats = FeatureStats.load(STORE).
    """
    from llamascope_sdk.base.dist import init_from_env
    from llamascope_sdk.corpus import check_corpus
    from llamascope_sdk.loading import demo
    from llamascope_sdk.loading.models import check_fits_window
    from llamascope_sdk.mining.checkpoint import default_checkpoint_dir
    from llamascope_sdk.mining.mine import mine, run_identity
    from llamascope_sdk.store.feature_store import (
        check_output_folder,
        check_stats_target,
        check_store_target,
        default_store_dir,
    )

    specs = {name: "demo" if demo.is_demo(name) else name for name in sae}  # checked once
    check_corpus(dataset)  # a missing or unreadable file is reported before any loading
    # Every output path is checked before anything loads or is mined (and the statistics'
    # folder created): a file, a folder the SDK did not write or an unwritable place is refused.
    if save_stats_to is not None and len(sae) > 1:
        raise typer.BadParameter("--save-stats-to takes one SAE", param_hint="--save-stats-to")
    if out is not None:
        (check_store_target if len(sae) == 1 else check_output_folder)(out)
    stats_file = check_stats_target(save_stats_to) if save_stats_to is not None else None
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU a rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    first, lm, tok = load_sae_and_model(sae[0], model, device, dtype, revision)
    check_fits_window(lm, context, what="--context")
    saes = _other_saes(first, sae, lm, revision=revision, device=device, features=features)
    targets = {name: (out if len(saes) == 1 else (out / s.name if out else None))
               or default_store_dir(s.name) for name, s in saes.items()}
    for name, target in targets.items():
        check_store_target(target, saes[name])
    if save_stats_to is not None:
        stats_file = check_stats_target(save_stats_to, first)
    kw: dict[str, Any] = dict(tokens=tokens, context=context, batch_size=batch_size, top_n=top_n,
                              n_samples=samples, deciles=deciles, example_context=example_context,
                              n_nonactivating=non_activating,
                              nonactivating_pool=non_activating_pool, split=split,
                              text_field=text_field)
    if checkpoint_every is not None and checkpoint_dir is None:
        checkpoint_dir = default_checkpoint_dir(run_identity(list(saes.values()), dataset, **kw))
    dist = init_from_env(device)
    results = mine(lm, tok, list(saes.values()), dataset, checkpoint_every=checkpoint_every,
                   checkpoint_dir=checkpoint_dir, progress=dist.is_main, **kw)
    if not dist.is_main:  # rank 0 writes the stores; every rank holds the same result
        return
    reports = []
    for name, s in saes.items():
        reports.append(_write_store(name, specs[name], s, results[s.name], lm, tok, targets[name],
                                    dataset=dataset,
                                    model=model, features=features, pages=pages,
                                    max_pages=max_pages, stats_file=stats_file))
    if as_json:
        echo_json(reports[0] if len(reports) == 1 else reports)
        return
    _print_reports(reports, hint_stats=stats_file is None and Path(sae[0]).expanduser().is_dir()
                   and specs[sae[0]] != "demo", first_sae=sae[0])


def _other_saes(first: Any, names: list[str], lm: Any, *, revision: str | None, device: str,
                features: list[int] | None) -> dict[str, Any]:
    """Every SAE of the run by its name: the first (already loaded with the model) and the
    others, each checked against the model, given once, and holding ``features``."""
    from llamascope_sdk.loading.compat import check_compatible
    from llamascope_sdk.loading.sae import SAE

    saes = {names[0]: first}
    for name in names[1:]:
        other = SAE.from_pretrained(name, revision=revision, device=device)
        check_compatible(lm, other)
        saes[name] = other
    if len({s.name for s in saes.values()}) != len(saes):
        raise typer.BadParameter("give each SAE once", param_hint="--sae")
    for s in saes.values():
        for f in features or []:
            s.check_features(f)
    return saes


def _print_reports(reports: list[dict[str, Any]], *, hint_stats: bool, first_sae: str) -> None:
    """What ``inspect`` says about each store it wrote (text mode)."""
    for r in reports:
        say(f"mined {r['d_sae']} features of {r['sae']} on {r['n_tokens']:,} tokens "
            f"({r['n_docs']:,} documents)")
        c = r["read"]
        say(f"read {c['tokens_read']:,} of {c['tokens_available']:,} tokens in "
            f"{c['documents']:,} documents " + ("(the whole corpus)" if c["exhausted"]
                                                else "(stopped by --tokens)")
            + "; long documents are read whole, in windows of --context tokens")
        say(f"store: {r['store']}")
        if r["index"]:
            say(f"pages: {r['index']}")
        for f, cmd in r["steer"].items():
            say(f"  feature {f}: {cmd or 'never fired on this corpus (nothing to steer by)'}")
    say(f"next: llamascope show {reports[0]['store']} FEATURE   |   in Python: "
        f"sae.stats = FeatureStats.load({reports[0]['store']!r})")
    if hint_stats:
        say(f"hint: --save-stats-to {first_sae} makes `steer --relative` work for this SAE", err=True)


def _write_store(spec_name: str, spec: str, s: Any, result: Any, lm: Any, tok: Any, target: Path, *,
                 dataset: str, model: str | None, features: list[int] | None, pages: bool,
                 max_pages: int, stats_file: Path | None) -> dict[str, Any]:
    """Write one SAE's store (and pages, and optionally its statistics); what was written."""
    from llamascope_sdk.store import view
    from llamascope_sdk.store.feature_store import FeatureStore
    from llamascope_sdk.store.pages import write_pages

    has_stats = s.stats is not None
    if stats_file is not None:
        path = result.stats.save(stats_file)
        say(f"feature statistics written to {path}", err=True)
        sae_dir = Path(spec_name).expanduser()
        has_stats = has_stats or (sae_dir.is_dir() and sae_dir.resolve() == path.resolve().parent)
    store = FeatureStore.from_result(result, tok, model=lm, sae_spec=spec, corpus=dataset,
                                     model_name=model or getattr(lm, "name_or_path", None))
    store.meta["sae_has_stats"] = has_stats

    def add_pages(st: FeatureStore, tmp: Path) -> None:
        write_pages(st, tmp / "pages", features, max_pages)

    store.save(target, extra=add_pages if pages else None)
    index = target / "pages" / "index.html" if pages else None
    return {"store": str(target), "index": str(index) if index else None, "sae": s.name,
            "d_sae": s.d_sae, "n_tokens": result.n_tokens, "n_docs": result.n_docs,
            "read": result.read,
            "features": [view.summary(store, f) for f in (features or [])],
            "steer": {f: view.store_steer_command(store, f) for f in (features or [])}}
