#!/usr/bin/env python
"""Build the shipped demo transcoder set (SmolLM2-135M, 30 layers x 320 features, K=16).

    python training/build_demo_transcoders.py --corpus DIR               # train -> measure -> ship
    python training/build_demo_transcoders.py --corpus DIR --eval-only   # re-measure the shipped set

DIR holds ``wikitext2-valid.txt`` and ``tinyshakespeare.txt`` (as for ``training/build_demo.py``;
``--corpus`` defaults to ``$LLAMASCOPE_CORPUS``).

1. trains the 30 transcoders of ``training/recipes/smollm2-135m-TC-demo.yaml`` (the template's
   layer 0 is replaced by 0..29) together with :func:`llamascope_sdk.training.loop.train`:
   one live LM pass feeds all 30 (one Top-K transcoder per layer, reading
   ``blocks.L.ln2.hook_normalized`` and predicting ``blocks.L.hook_mlp_out``), seeded, with
   checkpoints (a killed run resumes), then the Top-K -> JumpReLU post-processing and export;
2. measures on held-out text (the last 10% of each corpus file, never trained on): per-layer
   L0 / explained variance / delta LM loss with that layer's MLP replaced
   (:func:`~llamascope_sdk.evaluation.evaluate.evaluate`), and the loss with all 30 MLPs
   replaced at once, without and with error terms
   (:func:`~llamascope_sdk.trace.quality.replacement_quality`);
3. ships the 30 release folders to ``llamascope_sdk/assets/smollm2-135m-TC-320/`` with one card
   for the set (README.md) and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPLATE = ROOT / "training/recipes/smollm2-135m-TC-demo.yaml"
COMMAND = "python training/build_demo_transcoders.py --corpus DIR"
N_LAYERS = 30


def layer_configs(corpus: str | None) -> list[Any]:
    """The 30 recipes: the template with layer L in its name and hook points, the dataset file
    names resolved inside ``corpus`` (exits with one line when a file is missing)."""
    from bench.corpus_files import corpus_files
    from llamascope_sdk.loading.demo import demo_tc_name
    from llamascope_sdk.training.config import TrainConfig

    t = TrainConfig.load(TEMPLATE)
    files = corpus_files(corpus, *(n.strip() for n in t.dataset.split(",")))
    data = ",".join(str(f) for f in files)
    return [t.model_copy(update={"name": demo_tc_name(L), "dataset": data,
                                 "hook_point_in": f"blocks.{L}.ln2.hook_normalized",
                                 "hook_point_out": f"blocks.{L}.hook_mlp_out"})
            for L in range(N_LAYERS)]


def heldout_ids(cfg: Any, tokenizer: Any, n_rows: int) -> torch.Tensor:
    """[n_rows, context] held-out token rows, spread over both files (build_demo's rule)."""
    from training.build_demo import heldout_rows

    return heldout_rows(cfg, tokenizer, n_rows)


def measure(model: Any, tok: Any, saes: list[Any], ids: torch.Tensor) -> dict[str, Any]:
    """Per-layer metrics and the all-replaced loss on the held-out rows ``ids``."""
    from llamascope_sdk.evaluation.evaluate import evaluate
    from llamascope_sdk.loading.models import special_ids
    from llamascope_sdk.trace.quality import replacement_quality

    t0 = time.time()
    per = evaluate(model, tok, {s.name: s for s in saes}, ids, tokens=ids.numel(),
                   context=ids.shape[1], batch_size=1, progress=False)
    layers = []
    for L, s in enumerate(saes):
        d = per[s.name].to_dict()
        layers.append({"layer": L, "name": s.name, "l0": d["l0_mean"],
                       "explained_variance": d["explained_variance_uncentred"],
                       "explained_variance_centred": d["explained_variance_centred"],
                       "delta_lm_loss": d["delta_lm_loss"], "kl_div": d["kl_div"],
                       "frac_dead": d["frac_dead"]})
        print(json.dumps(layers[-1]))
    q = replacement_quality(model, saes, ids, special_ids(tok))
    print(json.dumps(q.to_dict()))
    return {"layers": layers, "all_replaced": q.to_dict(), "eval_rows": list(ids.shape),
            "eval_seconds": time.time() - t0}


def ship(export_root: Path, cfgs: list[Any]) -> Path:
    """Copy the 30 release folders into the package (recipes name data files only)."""
    from llamascope_sdk.loading.demo import DEMO_TC_DIR

    DEMO_TC_DIR.mkdir(parents=True, exist_ok=True)
    for cfg in cfgs:
        dest = DEMO_TC_DIR / cfg.name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(export_root / cfg.name, dest)
        for f in dest.rglob("*"):  # mkstemp creates 0600 files; ship world-readable ones
            f.chmod(0o755 if f.is_dir() else 0o644)
        names = ",".join(Path(n).name for n in cfg.dataset.split(","))
        shipped = cfg.model_copy(update={"dataset": names, "activation_cache": None})
        (dest / "recipe.yaml").write_text(shipped.to_yaml())
    shutil.copy(TEMPLATE, DEMO_TC_DIR / "recipe-template.yaml")
    return DEMO_TC_DIR


def main() -> None:
    from bench.corpus_files import add_corpus_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_argument(p)
    p.add_argument("--export", default=str(ROOT / "runs/demo-tc-export"),
                   help="where training exports the 30 folders before they are shipped")
    p.add_argument("--skip-train", action="store_true", help="ship what --export holds")
    p.add_argument("--eval-only", action="store_true",
                   help="re-measure the shipped set and rewrite its card and results.json")
    p.add_argument("--eval-rows", type=int, default=4, help="held-out rows of 1024 tokens")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="with --skip-train: the training time of the run that made --export")
    args = p.parse_args()
    cfgs = layer_configs(args.corpus)  # before any long work: one line if the corpus is missing
    torch.manual_seed(0)
    train_s = args.train_seconds
    if not args.eval_only:
        if not args.skip_train:
            from llamascope_sdk.training.loop import train

            t0 = time.time()
            train(cfgs, resume=True, progress=False, export_to=Path(args.export))
            train_s = time.time() - t0
        ship(Path(args.export), cfgs)
    from llamascope_sdk.loading.models import load_model
    from llamascope_sdk.trace.demo import demo_transcoders

    model, tok = load_model(cfgs[0].model)
    saes = demo_transcoders(model)
    result = measure(model, tok, saes, heldout_ids(cfgs[0], tok, args.eval_rows))
    write_results(result, train_s)


def write_results(result: dict[str, Any], train_s: float | None) -> None:
    """results.json and the set's card (README.md) in the shipped folder."""
    from llamascope_sdk.base.atomic import atomic_write_text
    from llamascope_sdk.loading.demo import DEMO_TC_DIR

    old = DEMO_TC_DIR / "results.json"
    if train_s is None and old.is_file():
        train_s = json.loads(old.read_text()).get("train_seconds")
    shipped = sum(f.stat().st_size for f in DEMO_TC_DIR.rglob("*") if f.is_file()
                  and f.name not in ("README.md", "results.json"))
    result = {**result, "train_seconds": train_s, "command": COMMAND,
              "shipped_mib": shipped / 2**20}
    atomic_write_text(old, json.dumps(result, indent=1) + "\n")
    atomic_write_text(DEMO_TC_DIR / "README.md", render_set_card(result))


def render_set_card(result: dict[str, Any]) -> str:
    """The set's README.md: what it is, how it was trained, what it measured."""
    from llamascope_sdk.training.config import TrainConfig

    t = TrainConfig.load(TEMPLATE)
    q = result["all_replaced"]
    rows = [f"| {r['layer']} | {r['l0']:.1f} | {r['explained_variance']:.3f} | "
            f"{r['explained_variance_centred']:.3f} | {r['delta_lm_loss']:.4f} | {r['frac_dead']:.3f} |"
            for r in result["layers"]]
    train = (f"{result['train_seconds'] / 60:.0f} min" if result.get("train_seconds")
             else "not recorded")
    n_tok = result["eval_rows"][0] * result["eval_rows"][1]
    return "\n".join([
        "# smollm2-135m-TC-320: a demo transcoder set for SmolLM2-135M", "",
        "One JumpReLU transcoder per layer of `HuggingFaceTB/SmolLM2-135M-Instruct` (30 layers), "
        "each reading the normalised MLP input without the RMSNorm gain "
        "(`blocks.L.ln2.hook_normalized`, as the Llama Scope LXTC transcoders do) and predicting "
        f"the MLP output (`blocks.L.hook_mlp_out`); {t.d_sae} features per layer (K = {t.top_k} "
        "during training, then one global JumpReLU threshold), bf16. It exists so that "
        "`llamascope trace --transcoders demo` runs offline on a CPU; it is small on purpose "
        f"(the repository ships it: {result.get('shipped_mib', 0):.1f} MiB in all).", "",
        "Load: `from llamascope_sdk.trace.demo import demo_transcoders; tcs = demo_transcoders()` "
        "(layer 0 first), or one layer by name: `SAE.from_pretrained(\"smollm2-135m-L5TC-320\")`. "
        "Feature stores (top examples per feature) are mined on first use from the "
        "repository's text excerpts: `llamascope_sdk.trace.demo.demo_stores()`.", "",
        "## Training", "",
        f"Built with `{COMMAND}`: the SDK's training package (`llamascope_sdk.training.loop.train`, "
        "the same code as `training/run.py`), all 30 transcoders fed by one live LM pass, recipe "
        "`recipe-template.yaml` (each layer's resolved recipe is its folder's `recipe.yaml`): "
        f"{t.total_tokens:,} tokens of `wikitext2-valid.txt` + `tinyshakespeare.txt` (WikiText-2 "
        f"validation and Tiny Shakespeare; the last {t.holdout_fraction:.0%} of each file held out), "
        f"batch {t.batch_size}, lr {t.lr:g}, seed {t.seed}, fp32 on CPU. Training took {train} on "
        "a 2-core CPU shared with other jobs (one thread). Seeded: multi-threaded CPU kernels sum "
        "in a varying order, so a re-run is close, not bit-identical.", "",
        "## Reconstruction quality (held-out text)", "",
        f"{result['eval_rows'][0]} held-out rows of {result['eval_rows'][1]} tokens ({n_tok:,} "
        "tokens); BOS is excluded and left clean. Per layer, from `evaluate` (that layer's MLP "
        "replaced alone): L0, explained variance of the MLP output (uncentred, the paper's "
        "formula, and centred), delta LM loss, fraction of features that never fired.", "",
        "| layer | L0 | EV | EV centred | delta LM loss | dead |", "|---|---|---|---|---|---|",
        *rows, "",
        f"All 30 MLPs replaced at once (`llamascope_sdk.trace.quality.replacement_quality`, "
        f"{q['n_tokens']:,} predicted tokens): cross-entropy {q['ce_clean']:.4f} clean vs "
        f"{q['ce_replaced']:.4f} replaced, **delta LM loss {q['delta_lm_loss']:.4f} nats**, "
        f"KL(clean || replaced) {q['kl_replaced']:.4f}. With the error terms added back (the "
        "replacement model of an attribution graph, error nodes included) the logits equal the "
        f"clean ones up to rounding: largest difference {q['max_abs_logit_diff_with_error']:.2e}.",
        "", "## Limits", "",
        "320 features per layer is far below what interpretable transcoders use (Llama Scope: "
        "32K-128K): many features are broad, the error nodes of a graph carry much of each MLP, "
        "and labels from the small mined corpus are rough. It is a demo and a test fixture, not a "
        "research artefact.", ""])


if __name__ == "__main__":
    main()
