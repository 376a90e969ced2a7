"""Explain and score many features with one chat endpoint, resumably.

:func:`plan_run` says what a run will send (requests and tokens, before anything is sent);
:func:`explain_features` sends it. Each feature is one job: the explainer request, then the
scorer requests (detection and fuzzing) on held-out contexts; its record is written to
``features/<i>.json`` atomically as soon as it is complete. A feature whose file exists is
skipped, so a killed run started again continues where it stopped and, with a deterministic
endpoint, ends with the same bytes as a run that was never stopped. Up to ``concurrency``
features are worked on at once; the client keeps at most ``concurrency`` requests in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamascope_sdk.base.endpoint import ChatClient, Usage
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.explain.cost import (
    Counter,
    Estimate,
    MessagesCounter,
    add,
    approx_tokens,
    estimate_feature,
)
from llamascope_sdk.explain.examples import ExampleSets, example_sets
from llamascope_sdk.explain.prompts import PROMPT_VERSION, explainer_messages, parse_explanation
from llamascope_sdk.explain.scoring import SCORERS, score
from llamascope_sdk.store.explanations import claim_folder, is_done, run_folder, write_feature


@dataclass(frozen=True)
class Settings:
    """The protocol of a run (written to config.json; a resumed run must use the same)."""

    n_explain: int = 20       #: contexts shown to the explainer
    n_score: int = 50         #: held-out activating and non-activating contexts per scorer
    batch: int = 5            #: contexts per scorer request
    seed: int = 0             #: seeds the scorers' shuffles
    scorers: tuple[str, ...] = SCORERS
    explain_max_tokens: int = 60

    def __post_init__(self) -> None:
        for name in ("n_explain", "n_score", "batch", "explain_max_tokens"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise InputError(f"unknown scorer {bad[0]!r}; allowed: {', '.join(SCORERS)}")


@dataclass
class Plan:
    folder: Path
    todo: list[int]
    skipped: list[int]
    estimate: Estimate


@dataclass
class RunResult:
    folder: Path
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    unparsable_explanations: int = 0
    unparsable_batches: int = 0
    usage: dict[str, int] = field(default_factory=dict)


def _config(store: Any, model: str, settings: Settings) -> dict[str, Any]:
    return {"model": model, "prompt_version": PROMPT_VERSION, "sae": store.name,
            "store_version": int(store.meta.get("version", 1)),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}}


def _folder(store: Any, model: str, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out).expanduser()
    if getattr(store, "path", None) is None:
        raise InputError("this store has no folder (it was never saved); pass out=FOLDER")
    return run_folder(store.path, model)


def plan_run(store: Any, features: Sequence[int], model: str, *, settings: Settings = Settings(),
             out: str | Path | None = None, count_tokens: Counter = approx_tokens,
             per_message: int = 4, per_request: int = 3,
             count_messages: MessagesCounter | None = None) -> Plan:
    """What :func:`explain_features` will do: the features left to do and their cost
    (``count_messages``: a whole request's tokens, e.g. :func:`.cost.template_counter`)."""
    folder = _folder(store, model, out)
    feats = [store.check_feature(i) for i in dict.fromkeys(features)]
    todo = [i for i in feats if not is_done(folder, i)]
    est = Estimate()
    for i in todo:
        sets = example_sets(store, i, n_explain=settings.n_explain, n_score=settings.n_score)
        est = add(est, estimate_feature(sets, i, count=count_tokens, seed=settings.seed,
                                        batch=settings.batch, scorers=settings.scorers,
                                        per_message=per_message, per_request=per_request,
                                        count_messages=count_messages,
                                        explain_max_tokens=settings.explain_max_tokens))
    return Plan(folder, todo, [i for i in feats if i not in set(todo)], est)


def _used(sets: ExampleSets) -> dict[str, Any]:
    return {"source": sets.source, "explain": [c.as_dict() for c in sets.explain],
            "activating": [c.as_dict() for c in sets.activating],
            "non_activating": [c.as_dict() for c in sets.non_activating]}


def explain_one(store: Any, i: int, client: ChatClient, settings: Settings) -> dict[str, Any]:
    """The record of feature ``i``: explanation, scores, and what was used to get them."""
    sets = example_sets(store, i, n_explain=settings.n_explain, n_score=settings.n_score)
    rec: dict[str, Any] = {"feature": i, "sae": store.name, "model": client.model,
                           "prompt_version": PROMPT_VERSION, "examples": _used(sets),
                           "explanation": None, "reply": None, "scores": None, "note": None,
                           "explainer_unparsable": False, "prompt_tokens": 0,
                           "completion_tokens": 0}
    if not sets.explain:
        rec["note"] = "the feature never fired in the mined corpus: nothing to explain"
        return rec
    r = client.chat(explainer_messages(sets.explain), max_tokens=settings.explain_max_tokens,
                    parse=parse_explanation)
    rec.update(explanation=r.value, reply=r.text, prompt_tokens=r.prompt_tokens,
               completion_tokens=r.completion_tokens)
    if r.value is None:
        rec["explainer_unparsable"] = True
        rec["note"] = "the explainer's reply could not be parsed (see reply): not scored"
    elif not sets.non_activating:
        rec["note"] = sets.note
    else:
        rec["scores"] = {k: score(client, k, r.value, sets, feature=i, seed=settings.seed,
                                  batch=settings.batch) for k in settings.scorers}
        for s in rec["scores"].values():
            rec["prompt_tokens"] += s.pop("prompt_tokens")
            rec["completion_tokens"] += s.pop("completion_tokens")
    return rec


def explain_features(store: Any, features: Sequence[int], client: ChatClient, *,
                     settings: Settings = Settings(), out: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> RunResult:
    """Explain and score ``features`` of ``store`` with ``client``; skip what is done.

    Raises:
        InputError: the output folder holds explanations made with other settings.
        EndpointError: the endpoint refused or kept failing (finished features are kept).
    """
    folder = _folder(store, client.model, out)
    claim_folder(folder, _config(store, client.model, settings))
    feats = [store.check_feature(i) for i in dict.fromkeys(features)]
    result = RunResult(folder, skipped=[i for i in feats if is_done(folder, i)])
    todo = [i for i in feats if i not in set(result.skipped)]
    before = Usage(**asdict(client.usage))

    def job(i: int) -> dict[str, Any]:
        rec = explain_one(store, i, client, settings)
        write_feature(folder, i, rec)
        return rec

    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=max(1, min(client.concurrency, len(todo) or 1))) as pool:
        futures = {pool.submit(job, i): i for i in todo}
        for f in as_completed(futures):
            exc = f.exception() if not f.cancelled() else None
            if f.cancelled():
                continue
            if exc is not None:
                errors.append(exc)
                for other in futures:
                    other.cancel()  # what already runs finishes and is kept
                continue
            rec = f.result()
            result.written.append(futures[f])
            result.unparsable_explanations += bool(rec["explainer_unparsable"])
            for s in (rec["scores"] or {}).values():
                result.unparsable_batches += s["unparsable_batches"]
            if progress is not None:
                progress(_line(rec, len(result.written), len(todo)))
    result.written.sort()
    now = client.usage
    result.usage = {k: getattr(now, k) - getattr(before, k) for k in asdict(now)}
    if errors:
        raise errors[0]
    return result


def _line(rec: dict[str, Any], k: int, n: int) -> str:
    scores = " ".join(f"{name} {s['balanced_accuracy']:.2f}" for name, s in
                      sorted((rec["scores"] or {}).items()) if s["balanced_accuracy"] is not None)
    what = repr(rec["explanation"]) if rec["explanation"] else f"({rec['note']})"
    return f"[{k}/{n}] feature {rec['feature']}: {what}{' ' + scores if scores else ''}"
