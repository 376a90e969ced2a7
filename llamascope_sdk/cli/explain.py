"""``explain``: describe and score features of a feature store with any OpenAI-compatible chat
model, or (without --endpoint) write the LLM-free output descriptions."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from llamascope_sdk.cli.app import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    app,
    check_text,
    command,
    echo_json,
    say,
)


def parse_features(spec: str, d_sae: int) -> list[int]:
    """``"0-99,120,130-140"`` -> the indices, each checked against ``d_sae``."""
    from llamascope_sdk.base.errors import FeatureIndexError, InputError

    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise InputError(f"--features {spec!r}: {part!r} is not an index or a range A-B; "
                             "write e.g. 0-99,120") from None
        if a > b:
            raise InputError(f"--features {spec!r}: range {part} runs backwards")
        if b >= d_sae:
            raise FeatureIndexError(f"--features {spec!r}: {b} is out of range 0..{d_sae - 1}")
        out.extend(range(a, b + 1))
    if not out:
        raise InputError("--features is empty; write e.g. 0-99,120")
    return list(dict.fromkeys(out))


def top_frequency(store: Any, n: int) -> list[int]:
    """The ``n`` most frequently firing features that are not dense (fire on at most
    :data:`~llamascope_sdk.core.metrics.DENSE_FREQUENCY` of the tokens)."""
    from llamascope_sdk.core.metrics import DENSE_FREQUENCY

    freq = store.stats.frequency.float()
    keep = (freq > 0) & (freq <= DENSE_FREQUENCY)
    order = sorted(keep.nonzero().squeeze(1).tolist(), key=lambda i: (-float(freq[i]), i))
    return order[:n]


def token_counter(name: str | None) -> tuple[Any, Any, str]:
    """Count tokens with the tokenizer ``name`` (a local folder, a cached Hub id or
    'smollm2-135m'), whole requests with its chat template when it has one; without a
    tokenizer, about 4 characters per token."""
    from llamascope_sdk.explain.cost import approx_tokens, template_counter, tokenizer_counter

    if name is None:
        return approx_tokens, None, "about 4 characters per token (--tokenizer counts exactly)"
    from transformers import AutoTokenizer

    from llamascope_sdk.loading.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name))
    messages = template_counter(tok)
    how = f"the {name} tokenizer" + (" and its chat template" if messages is not None else "")
    return tokenizer_counter(tok), messages, how


def save_labels(store: Any, folder: Path) -> tuple[int, int]:
    """Write the best explanation of each feature into ``folder/feature_labels.json``; labels
    already there are kept. Returns (added, kept)."""
    from llamascope_sdk.core.feature_stats import LABELS_FILE, read_labels, write_labels
    from llamascope_sdk.store.explanations import descriptions, label_text

    path = folder / LABELS_FILE
    old = read_labels(path, store.d_sae) if path.is_file() else {}
    new = {i: label_text(r) for i, r in descriptions(store.path).items() if i not in old}
    write_labels(path, {**old, **new})
    return len(new), len(old)


def _select(store: Any, features: str | None, top_freq: int | None, search: str | None,
            top: int, device: str, dtype: str | None) -> list[int]:
    from llamascope_sdk.base.errors import InputError

    given = [x is not None for x in (features, top_freq, search)]
    if sum(given) != 1:
        raise InputError("choose the features with exactly one of --features 0-99, "
                         "--top-frequency N or --search TEXT")
    if features is not None:
        return parse_features(features, store.d_sae)
    if top_freq is not None:
        return top_frequency(store, top_freq)
    assert search is not None
    check_text(search, "--search")
    from llamascope_sdk.store.search import search_features

    sae, lm, tok = _load(store, device, dtype)
    return [h.feature for h in search_features(lm, tok, sae, search, stats=store.stats, top=top)]


def _load(store: Any, device: str, dtype: str | None) -> tuple[Any, Any, Any]:
    from llamascope_sdk.cli.app import load_sae_and_model

    return load_sae_and_model(str(store.meta.get("sae_spec") or store.name),
                              store.meta.get("model"), device, dtype, None)


@app.command()
@command
def explain(
        store: Annotated[str, typer.Argument(help="A feature store folder (from `llamascope inspect --out`), or an SAE name whose store is in the default location.")],
        features: Annotated[str | None, typer.Option("--features", "-f", help="Features: indices and ranges, e.g. 0-99,120.", show_default=False)] = None,
        top_frequency_n: Annotated[int | None, typer.Option("--top-frequency", min=1, help="The N most frequent features that are not dense.", show_default=False)] = None,
        search: Annotated[str | None, typer.Option("--search", help="The features most specific to this text (loads the model).", show_default=False)] = None,
        top: Annotated[int, typer.Option(min=1, help="With --search: how many features.")] = 20,
        endpoint: Annotated[str | None, typer.Option(help="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1. [default: none: write the LLM-free descriptions]", show_default=False)] = None,
        model: Annotated[str | None, typer.Option("--model", "-m", help="The explainer and scorer model's name at the endpoint.", show_default=False)] = None,
        api_key_env: Annotated[str | None, typer.Option(help="Environment variable that holds the API key (never pass the key itself).", show_default=False)] = None,
        concurrency: Annotated[int, typer.Option(min=1, max=256, help="Requests in flight at once.")] = 4,
        max_cost_tokens: Annotated[int | None, typer.Option(min=1, help="Refuse a run estimated above this many tokens, and stop one that reaches it.", show_default=False)] = None,
        timeout: Annotated[float, typer.Option(min=1, help="Seconds a request may wait for the server (a local server on a CPU can take minutes under load; a timed-out request is sent again, which adds load).")] = 600.0,
        n_explain: Annotated[int, typer.Option(min=1, help="Contexts shown to the explainer.")] = 20,
        n_score: Annotated[int, typer.Option(min=1, help="Held-out activating and non-activating contexts per scorer.")] = 50,
        scorer_batch: Annotated[int, typer.Option(min=1, max=50, help="Contexts per scorer request, answered as a list of 0/1; 1 asks one yes/no question per context (more requests, a format small local models can follow).")] = 5,
        tokenizer: Annotated[str | None, typer.Option(help="Tokenizer for the cost estimate (local folder, cached Hub id or smollm2-135m). [default: 4 characters per token]", show_default=False)] = None,
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for the records. [default: STORE/explanations/<model>]", show_default=False)] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the estimate and stop.")] = False,
        save_labels_to: Annotated[Path | None, typer.Option("--save-labels-to", help="Also write the explanations as FOLDER/feature_labels.json (e.g. the SAE's local folder), for steer and encode captions; labels already there are kept.", show_default=False)] = None,
        device: DeviceOpt = "cpu", dtype: DtypeOpt = None, as_json: JsonOpt = False) -> None:
    """Explain features in words and score the explanations (detection, fuzzing), resumably.

    With --endpoint and --model, each feature costs one explainer request and, on held-out
    contexts, detection and fuzzing requests (--scorer-batch contexts each); the number of requests and
    tokens is printed before anything is sent. Records go to STORE/explanations/<model>/;
    running again skips finished features. Without --endpoint, writes VocabProj (logit lens)
    and TokenChange (steering) descriptions, which need no LLM.
    """
    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.store.feature_store import load_store

    if endpoint is not None and not model:
        raise InputError("--endpoint needs --model NAME (the model the endpoint serves)")
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise InputError(f"--api-key-env {api_key_env}: that environment variable is not "
                             "set or empty", hint=f"export {api_key_env}=... first")
    if save_labels_to is not None and save_labels_to.exists() and not save_labels_to.is_dir():
        raise InputError(f"--save-labels-to {save_labels_to} is not a folder")
    st = load_store(store)
    feats = _select(st, features, top_frequency_n, search, top, device, dtype)
    if endpoint is None:
        _llm_free(st, feats, device, dtype, as_json)
    else:
        assert model is not None
        _run(st, feats, endpoint, model, api_key, concurrency, max_cost_tokens, timeout,
             n_explain, n_score, scorer_batch, tokenizer, out, dry_run, as_json)
        if dry_run:
            return
    from llamascope_sdk.store.pages import refresh_pages

    if refresh_pages(st, feats):
        typer.echo(f"feature pages updated: {st.path}/pages/index.html", err=True)
    if save_labels_to is not None:
        added, kept = save_labels(st, save_labels_to)
        typer.echo(f"{save_labels_to / 'feature_labels.json'}: {added} labels added, "
                   f"{kept} kept", err=True)


def _llm_free(st: Any, feats: list[int], device: str, dtype: str | None, as_json: bool) -> None:
    from llamascope_sdk.explain.llm_free import describe_outputs

    sae, lm, tok = _load(st, device, dtype)
    folder = describe_outputs(st, feats, model=lm, tokenizer=tok, sae=sae)
    if as_json:
        echo_json({"folder": str(folder), "features": feats})
    else:
        typer.echo(f"VocabProj and TokenChange of {len(feats)} features: {folder}")


def _run(st: Any, feats: list[int], endpoint: str, model: str, api_key: str | None,
         concurrency: int, max_cost: int | None, timeout: float, n_explain: int, n_score: int,
         scorer_batch: int,
         tokenizer: str | None, out: Path | None, dry_run: bool, as_json: bool) -> None:
    from llamascope_sdk.base.endpoint import ChatClient
    from llamascope_sdk.base.errors import InputError
    from llamascope_sdk.explain import Settings, explain_features, plan_run

    settings = Settings(n_explain=n_explain, n_score=n_score, batch=scorer_batch)
    client = ChatClient(endpoint, model, api_key=api_key, concurrency=concurrency,
                        timeout=timeout, token_budget=max_cost)
    count, count_messages, how = token_counter(tokenizer)
    plan = plan_run(st, feats, model, settings=settings, out=out, count_tokens=count,
                    count_messages=count_messages)
    typer.echo(f"to send: {plan.estimate.line()}; {len(plan.skipped)} features already done; "
               f"tokens counted with {how}", err=True)
    if max_cost is not None and plan.estimate.total_tokens > max_cost:
        raise InputError(f"the run is estimated at {plan.estimate.total_tokens:,} tokens, above "
                         f"--max-cost-tokens {max_cost:,}; nothing was sent",
                         hint="choose fewer features, a smaller --n-score, or raise the limit")
    if dry_run:
        if as_json:
            echo_json({"estimate": plan.estimate.as_dict(), "todo": plan.todo,
                       "skipped": plan.skipped})
        return
    res = explain_features(st, feats, client, settings=settings, out=out,
                           progress=lambda line: say(line, err=True))
    summary = {"folder": str(res.folder), "written": len(res.written),
               "skipped": len(res.skipped), "unparsable_explanations": res.unparsable_explanations,
               "unparsable_scorer_batches": res.unparsable_batches, "usage": res.usage,
               "estimate": plan.estimate.as_dict()}
    if as_json:
        echo_json(summary)
        return
    u = res.usage
    typer.echo(f"{len(res.written)} features explained ({len(res.skipped)} were done) in "
               f"{res.folder}\nendpoint reported {u['prompt_tokens']:,} prompt + "
               f"{u['completion_tokens']:,} completion tokens over {u['requests']:,} requests "
               f"({u['retries']} retries); estimated {plan.estimate.total_tokens:,} tokens\n"
               f"unparsable replies: {res.unparsable_explanations} explanations, "
               f"{res.unparsable_batches} scorer batches (left out, never guessed)")
