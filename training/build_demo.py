#!/usr/bin/env python
"""Build the shipped demo SAE (SmolLM2-135M, L15R, 4608 features, K=32) end to end.

    python training/build_demo.py --corpus DIR              # cache -> train -> evaluate -> ship
    python training/build_demo.py --corpus DIR --eval-only  # re-measure the shipped SAE, re-render its card

DIR holds ``wikitext2-valid.txt`` and ``tinyshakespeare.txt`` (local copies of WikiText-2
validation and Tiny Shakespeare; where to download them: ``bench/corpus_files.py``, or the error
message when they are missing); ``--corpus`` defaults to ``$LLAMASCOPE_CORPUS``. The recipe and
the shipped files name the data by file name only, never by a path of this machine.

1. caches layer-15 residual activations of the training part of the corpus once (early stop
   after layer 15; ~262K tokens, resumable);
2. trains the recipe ``training/recipes/smollm2-135m-L15R-8x.yaml`` from the cache for several
   epochs (seeded, CPU-deterministic);
3. evaluates L0, EV (centred and uncentred) and delta LM loss on held-out text (the last 10%
   of each corpus file, never cached or trained on);
4. ranks features by selectivity for Shakespeare vs Wikipedia documents and by top tokens,
   tries steering with them, and writes everything into the card;
5. ships the release folder to ``llamascope_sdk/assets/<name>/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "training/recipes/smollm2-135m-L15R-8x.yaml"
COMMAND = "python training/build_demo.py --corpus DIR"
#: How the card names the training data (the recipe's ``dataset`` holds the file names).
DATA_LABEL = ("`wikitext2-valid.txt` + `tinyshakespeare.txt` (local copies of WikiText-2 "
              "validation and Tiny Shakespeare)")
PROMPT = "My favourite thing about the city is"
#: Steering strengths tried, as fractions of the site's dataset-average norm n_in (~168 here):
#: steering every position, prompt and generated, degenerates into repetition above ~1x.
STRENGTH_FRACTIONS = (0.25, 0.5, 1.0)
#: The fraction shown in the card's table.
SHOWN = 0.5
#: Positions with ||x|| above this multiple of the dataset norm are "massive activations".
MASSIVE = 10.0
#: Metric columns of the card: every non-special token, and without massive activations.
ALL, EXCLUDING = "all non-special tokens", "excluding massive activations"
#: The corpus files' Hub sources, for the card's front matter (the run reads local copies).
DATASETS = ["Salesforce/wikitext", "karpathy/tiny_shakespeare"]


def with_corpus(cfg, corpus: str | Path | None):  # noqa: ANN001, ANN201
    """The recipe with its dataset file names resolved inside ``corpus``; exits with one line
    (what is missing, where to download it) when it is not given or lacks one of them."""
    from bench.corpus_files import corpus_files

    files = corpus_files(corpus, *(Path(n.strip()).name for n in cfg.dataset.split(",")))
    return cfg.model_copy(update={"dataset": ",".join(str(f) for f in files)})


def shipped_recipe(cfg):  # noqa: ANN001, ANN201
    """The recipe as shipped: dataset files by name only (no path of this machine)."""
    names = ",".join(Path(n.strip()).name for n in cfg.dataset.split(","))
    return cfg.model_copy(update={"dataset": names})


@torch.no_grad()
def feature_counts(sae, x: torch.Tensor, group: torch.Tensor,  # noqa: ANN001
                   chunk: int = 4096) -> dict[str, torch.Tensor]:
    """Per-feature firing counts overall and in ``group`` (bool [N]), and activation sums."""
    fires = torch.zeros(sae.d_sae)
    fires_g = torch.zeros(sae.d_sae)
    mass = torch.zeros(sae.d_sae)
    for s in range(0, x.shape[0], chunk):
        f = sae.encode(x[s:s + chunk].float())
        on = (f > 0).float()
        fires += on.sum(0)
        fires_g += on[group[s:s + chunk]].sum(0)
        mass += f.sum(0)
    return {"fires": fires, "fires_group": fires_g, "mass": mass}


@torch.no_grad()
def top_tokens(sae, x: torch.Tensor, tokens: torch.Tensor, feature: int, tokenizer: Any,  # noqa: ANN001
               n: int = 8, chunk: int = 8192) -> list[tuple[str, float]]:
    """Tokens with the largest total activation of ``feature`` (decoded, with their share)."""
    acts = torch.cat([sae.encode_features(x[s:s + chunk].float(), [feature])[:, 0]
                      for s in range(0, x.shape[0], chunk)])
    totals: Counter[int] = Counter()
    for t, a in zip(tokens[acts > 0].tolist(), acts[acts > 0].tolist(), strict=True):
        totals[t] += a
    whole = sum(totals.values()) or 1.0
    return [(tokenizer.decode([t]), v / whole) for t, v in totals.most_common(n)]


def selective_features(stats: dict[str, torch.Tensor], group_fraction: float, n: int = 10,
                       min_freq: float = 1e-3, total: int = 1) -> list[int]:
    """Features that fire often and mostly inside the group (e.g. Shakespeare documents)."""
    freq = stats["fires"] / total
    share = stats["fires_group"] / stats["fires"].clamp_min(1)
    score = torch.where(freq > min_freq, share, torch.zeros_like(share)) * freq.sqrt()
    score[share < max(0.95, group_fraction)] = 0
    return [int(i) for i in score.topk(n).indices if score[i] > 0]


def heldout_rows(cfg, tokenizer, n_rows: int) -> torch.Tensor:  # noqa: ANN001
    """[n_rows, context] token rows of the held-out text, spread evenly over both files."""
    from llamascope_sdk.training.data import TokenSource

    src = TokenSource(tokenizer, cfg.dataset, text_field=cfg.text_field,
                      context_size=cfg.context_size, holdout_fraction=cfg.holdout_fraction,
                      heldout=True, split_long=True, loop=False)
    rows = [r for d in src._local or [] for _, r in src.encode(d) if len(r) == cfg.context_size]
    step = max(1, len(rows) // n_rows)
    return torch.tensor(rows[::step][:n_rows], dtype=torch.long)


def measure(model, tokenizer, sae, cfg, n_rows: int) -> dict[str, dict]:  # noqa: ANN001
    """Held-out metrics on all non-special tokens and without the massive activations."""
    from llamascope_sdk.evaluation.evaluate import evaluate

    ids = heldout_rows(cfg, tokenizer, n_rows)
    cut = MASSIVE * sae.hyperparams.dataset_average_activation_norm.in_
    out = {}
    for label, exclude in ((ALL, None), (EXCLUDING, cut)):
        res = evaluate(model, tokenizer, sae, ids, tokens=ids.numel(), context=cfg.context_size,
                       progress=False, exclude_norm_above=exclude)
        out[label] = {**next(iter(res.values())).to_dict(), "model": cfg.model}  # not a cache path
        print(label, json.dumps({k: v for k, v in out[label].items() if k != "l0"}))
    return out


def steer_text(model, tokenizer, sae, feature: int, strength: float, prompt: str):  # noqa: ANN001, ANN201
    """Greedy continuations of ``prompt`` without and with the feature steered (all positions)."""
    from llamascope_sdk import compare_generations
    from llamascope_sdk.steering.interventions import Steer

    return compare_generations(model, tokenizer, prompt, Steer(sae, [feature], strength),
                               max_new_tokens=24)


def main() -> None:
    from bench.corpus_files import add_corpus_argument
    from llamascope_sdk.training.config import TrainConfig

    p = argparse.ArgumentParser(description=__doc__)
    add_corpus_argument(p)
    p.add_argument("--cache", default=str(ROOT / "runs/demo-cache"))
    p.add_argument("--cache-tokens", type=int, default=353_990,
                   help="the shipped SAE used exactly 5 shards = 353,990 tokens")
    p.add_argument("--eval-rows", type=int, default=8, help="held-out rows of 1024 tokens")
    p.add_argument("--skip-train", action="store_true", help="reuse runs/demo-export")
    p.add_argument("--eval-only", action="store_true",
                   help="re-measure the shipped SAE in llamascope_sdk/assets and re-render its "
                        "card and demo_results.json; the weights are not touched")
    args = p.parse_args()
    recipe = TrainConfig.load(RECIPE)
    with_corpus(recipe, args.corpus)  # before any long work: one line if the corpus is missing
    torch.manual_seed(0)
    if args.eval_only:
        eval_only(args.eval_rows, args.corpus)
        return
    from llamascope_sdk.loading.models import load_model
    from llamascope_sdk.loading.sae import SAE
    from llamascope_sdk.training.cache import read_manifest
    from llamascope_sdk.training.loop import train

    cfg = with_corpus(recipe, args.corpus).model_copy(
        update={"activation_cache": args.cache})
    if not (Path(args.cache) / "manifest.json").is_file() or not read_manifest(args.cache)["complete"]:
        from training.run import main as run_main

        if run_main(["--config", str(RECIPE), "--set", f"dataset={cfg.dataset}", "--make-cache",
                     args.cache, "--cache-tokens", str(args.cache_tokens)]):
            sys.exit(1)
    export_root = ROOT / "runs/demo-export"
    t0 = time.time()
    if not args.skip_train:
        shutil.rmtree(ROOT / "runs" / cfg.name, ignore_errors=True)
        train([cfg], resume=False, export_to=export_root)
    train_s = time.time() - t0
    folder = export_root / cfg.name
    sae = SAE.from_pretrained(folder)
    model, tok = load_model(cfg.model)
    metrics = measure(model, tok, sae, cfg, args.eval_rows)
    feats, baseline = find_features(model, tok, sae, cfg, args.cache)
    result = {"metrics": metrics, "features": feats, "prompt": PROMPT, "baseline": baseline,
              "steer_positions": "all", "train_seconds": train_s, "command": COMMAND}
    (folder / "demo_results.json").write_text(json.dumps(result, indent=1) + "\n")
    write_stats(model, tok, sae, cfg, ship(folder, cfg, result))


def find_features(model, tok, sae, cfg, cache: str) -> tuple[list[dict], str]:  # noqa: ANN001
    """Shakespeare-selective and punctuation features from the cache, each steered at
    2x/4x/8x its largest activation; returns them and the unsteered continuation."""
    from safetensors.torch import load_file

    from llamascope_sdk.training.cache import read_manifest
    from llamascope_sdk.training.data import local_documents
    # features: from the first shard (Wikipedia) and the last one (mostly Shakespeare)
    man = read_manifest(cache)
    shards = [load_file(str(Path(cache) / s["file"])) for s in (man["shards"][0], man["shards"][-1])]
    docs = torch.cat([s["doc"] for s in shards])
    x = torch.cat([s[cfg.hook_point_in] for s in shards])
    toks = torch.cat([s["tokens"] for s in shards])
    del shards
    first_file = cfg.dataset.split(",")[0]
    n_wiki = len(local_documents(first_file, holdout_fraction=cfg.holdout_fraction))
    group = docs >= n_wiki  # Shakespeare documents come after the Wikipedia ones
    stats = feature_counts(sae, x, group)
    shakes = selective_features(stats, float(group.float().mean()), n=12, total=x.shape[0])
    # context features (diffuse over tokens) first: they steer topic/style, not one token
    shakes.sort(key=lambda i: top_tokens(sae, x, toks, i, tok, n=1)[0][1])
    punct = [i for i in stats["fires"].topk(200).indices.tolist()
             if (tt := top_tokens(sae, x, toks, i, tok, n=1)) and tt[0][1] > 0.6
             and not tt[0][0].strip().isalnum() and i not in shakes[:2]][:1]
    feats = []
    for i in [*shakes[:2], *punct]:
        acts = sae.encode_features(x[:65536].float(), [i])[:, 0]
        feats.append({"feature": i, "freq": float(stats["fires"][i] / x.shape[0]),
                      "shakespeare_share": float(stats["fires_group"][i] / stats["fires"][i].clamp_min(1)),
                      "top_tokens": top_tokens(sae, x, toks, i, tok), "max_act": float(acts.max())})
    baseline = steer_grid(model, tok, sae, feats)
    for f in feats:
        print(json.dumps(f))
    return feats, baseline


def write_stats(model, tok, sae, cfg, dest: Path, max_tokens: int = 20_000) -> None:  # noqa: ANN001
    """feature_stats.safetensors beside the checkpoint: each feature's typical activation on
    held-out text, so that relative steering and mean ablation work offline."""
    from llamascope_sdk import measure_feature_stats
    from llamascope_sdk.corpus import local_documents

    docs = local_documents(cfg.dataset, cfg.text_field, holdout_fraction=cfg.holdout_fraction,
                           heldout=True)
    # both files' held-out tails, alternating, so both kinds of text are counted
    half = len(docs) // 2
    mixed = [d for pair in zip(docs[:half], docs[half:], strict=False) for d in pair]
    measure_feature_stats(model, tok, sae, [d[:4000] for d in mixed], max_tokens=max_tokens, save_to=dest)


def steer_grid(model, tok, sae, feats: list[dict]) -> str:  # noqa: ANN001
    """Steer each feature at STRENGTH_FRACTIONS x n_in (every position); fill the entries in
    place and return the unsteered continuation."""
    norm = sae.hyperparams.dataset_average_activation_norm.in_
    baseline = ""
    for f in feats:
        runs = {m: steer_text(model, tok, sae, f["feature"], m * norm, PROMPT) for m in STRENGTH_FRACTIONS}
        baseline = runs[SHOWN].baseline
        f.update({"strength": SHOWN * norm, "steered": runs[SHOWN].steered,
                  "steer_grid": {f"{m * norm:g}": r.steered for m, r in runs.items()}})
    return baseline


def eval_only(n_rows: int, corpus: str) -> None:
    """Re-measure the shipped SAE on the held-out text and rewrite its card and results; the
    weights are checked to be byte-identical before and after."""
    from llamascope_sdk.base.atomic import atomic_write_text
    from llamascope_sdk.loading.models import load_model
    from llamascope_sdk.loading.sae import SAE
    from llamascope_sdk.training.config import TrainConfig

    dest = ROOT / "llamascope_sdk/assets" / TrainConfig.load(RECIPE).name
    cfg = with_corpus(TrainConfig.load(dest / "recipe.yaml"), corpus)
    before = _weight_digests(dest)
    sae = SAE.from_pretrained(dest)
    model, tok = load_model(cfg.model)
    result = json.loads((dest / "demo_results.json").read_text())
    result.pop("metrics_excluding_massive", None)  # now a column of "metrics"
    result.pop("eval_tokens", None)
    result["metrics"] = measure(model, tok, sae, cfg, n_rows)
    result["baseline"] = steer_grid(model, tok, sae, result["features"])
    write_stats(model, tok, sae, cfg, dest)
    result["steer_positions"] = "all"
    atomic_write_text(dest / "demo_results.json", json.dumps(result, indent=1) + "\n")
    write_card(dest, cfg, result)
    if _weight_digests(dest) != before:
        raise RuntimeError(f"the weights in {dest} changed")
    print(json.dumps({"weights_sha256": before}, indent=1))


def _weight_digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((folder / "checkpoints").rglob("*.safetensors"))}


def ship(folder: Path, cfg, result: dict) -> Path:  # noqa: ANN001
    """Copy the release folder into the package with its card, recipe and results."""
    from llamascope_sdk.base.atomic import atomic_write_text

    dest = ROOT / "llamascope_sdk/assets" / cfg.name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(folder, dest)
    for f in dest.rglob("*"):  # mkstemp creates 0600 files; ship world-readable ones
        f.chmod(0o755 if f.is_dir() else 0o644)
        if f.suffix in {".yaml", ".json", ".md"}:  # no machine-specific absolute paths
            f.write_text(f.read_text().replace(f"{ROOT}/", ""))
    atomic_write_text(dest / "recipe.yaml", shipped_recipe(cfg).to_yaml())
    write_card(dest, cfg, result)
    return dest


def write_card(dest: Path, cfg, result: dict) -> Path:  # noqa: ANN001
    """The demo's README.md through llamascope_sdk.loading.cards.render_card (the release template)."""
    from llamascope_sdk.base.atomic import atomic_write_text
    from llamascope_sdk.loading.cards import render_card
    from llamascope_sdk.loading.demo import DEMO_FEATURES
    from llamascope_sdk.training.export import card_info

    hp = json.loads((dest / "hyperparams.json").read_text())
    cfg = shipped_recipe(cfg).model_copy(update={"activation_cache": None})
    m = result["metrics"]
    n_tok, n_big = m[ALL]["n_tokens"], m[EXCLUDING]["n_excluded"]
    note = (f"Held-out text: the last 10% of each corpus file (WikiText-2 valid and Tiny "
            f"Shakespeare), never cached or trained on; {n_tok:,} non-special tokens, special "
            f"tokens left clean. Massive activations: {n_big} of {n_tok:,} positions have "
            f"||x|| > {MASSIVE:g} x the dataset norm (SmolLM2 gives some first tokens after BOS "
            "norms of several thousand vs ~170 on average). The SAE, like any SAE trained on "
            "this distribution, reconstructs them badly, and they dominate the summed error; the "
            "right column leaves them clean (like BOS) and excludes them "
            "(`evaluate(..., exclude_norm_above=...)`).")
    info = card_info(cfg, hp, m, data_label=DATA_LABEL, load_name="demo", command=COMMAND,
                     metrics_note=note, extra=_features_markdown(result, DEMO_FEATURES),
                     datasets=DATASETS)
    return atomic_write_text(dest / "README.md", render_card(info))


def _features_markdown(result: dict, demo_features) -> str:  # noqa: ANN001
    where = {"all": "every non-special position, prompt and generated tokens alike",
             "prompt": "the prompt's non-BOS positions only (the build that produced this table "
                       "did not steer KV-cached generation steps; `llamascope steer` and "
                       "`compare_generations` steer every position)"}[result.get("steer_positions",
                                                                              "prompt")]
    lines = ["## Features", "", "Steering adds strength * (unit decoder row) to the residual "
             f"stream at {where}; prompt: \"{result['prompt']}\"; unsteered greedy continuation: "
             f"\"{result['baseline']}\".", "",
             "| feature | fires on (top tokens, share of activation) | freq | Shakespeare share | "
             "strength | steered continuation |", "|---|---|---|---|---|---|"]
    for f in result["features"]:
        tops = ", ".join(f"`{t!r}` {s:.0%}" for t, s in f["top_tokens"][:5])
        steered = repr(f["steered"]).replace("|", "/")
        lines.append(f"| {f['feature']} | {tops} | {f['freq']:.3%} | {f['shakespeare_share']:.0%} "
                     f"| {f['strength']:.3g} | {steered} |")
    from llamascope_sdk.core.feature_stats import LABELS_FILE, read_labels
    from llamascope_sdk.loading.demo import DEMO_SAE_DIR

    labels = read_labels(DEMO_SAE_DIR / LABELS_FILE, 1 << 30)
    chosen = ", ".join(f"{d.index} at {d.strength:g} ({labels.get(d.index, 'unlabelled')})"
                       for d in demo_features)
    grid = "/".join(f"{m:g}x" for m in STRENGTH_FRACTIONS)
    lines += ["", f"The table steers at {SHOWN:g} x the dataset-average norm n_in; "
              f"`demo_results.json` holds the {grid} n_in grid. "
              f"`llamascope_sdk.loading.demo.DEMO_FEATURES` lists {chosen}; the first is the "
              "default of `llamascope steer --sae demo`, at the strength the held-out "
              "`llamascope eval-steer` sweep chose (the package README, *Results on the demo*).",
              "",
              "`feature_stats.safetensors` holds each feature's typical activation (the mean of "
              "its non-zero activations over 20,000 held-out non-special tokens), the unit of "
              "relative strengths: `llamascope steer --sae demo -f 1297 -a 4 --relative`.", "",
              f"Training took {result['train_seconds']:.0f} s on a shared 2-core CPU. Seeded; "
              "multi-threaded CPU sparse kernels sum in a varying order, so a re-run is close but "
              "not bit-identical. Measured on a second run of the build (with the earlier "
              "training-side evaluator): EV excluding massive activations 0.8309 vs 0.8313, delta "
              "LM loss 0.1817 vs 0.1773, L0 34.19 vs 34.21, same three features; all-token EV "
              "0.401 vs 0.423 (dominated by one token). Tolerance: 0.01 for EV (excluding massive) "
              "and delta LM loss, 0.5 for L0, 0.05 for the all-token EV."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
