"""The shipped demo SAE: release layout, size budget, loadable, constants consistent."""

from __future__ import annotations

import json
from pathlib import Path

from llamascope_sdk.loading import demo
from llamascope_sdk.loading.sae import SAE


def test_demo_sae_is_a_small_release_folder() -> None:
    folder = Path(demo.DEMO_SAE_DIR)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 12 * 2**20
    hp = json.loads((folder / "hyperparams.json").read_text())
    assert hp["act_fn"] == "jumprelu" and hp["d_model"] == 576 and hp["d_sae"] == 4608
    assert (folder / "recipe.yaml").is_file() and (folder / "README.md").is_file()
    sae = SAE.from_pretrained(folder)
    assert sae.d_sae == 4608 and demo.DEMO_MODEL == "smollm2-135m"
    for f in demo.DEMO_FEATURES:
        assert 0 <= f.index < sae.d_sae and f.strength > 0 and f.prompt
        assert sae.labels[f.index]  # every recommended feature is labelled (feature_labels.json)
    assert demo.DEMO_FEATURE.index == demo.DEMO_FEATURES[0].index


def test_shipped_files_name_no_path_outside_the_repository() -> None:
    folder = Path(demo.DEMO_SAE_DIR)
    for f in folder.iterdir():
        if f.suffix in {".yaml", ".md", ".json"}:
            text = f.read_text(encoding="utf-8")
            for bad in ("../", "/work/", "/home/", "/tmp/", "shared/corpus"):
                assert bad not in text, (f.name, bad)


def test_shipped_recipe_names_corpus_files_that_build_demo_resolves(corpus_dir) -> None:
    import sys

    from llamascope_sdk.training.config import TrainConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from training.build_demo import RECIPE, shipped_recipe, with_corpus

    shipped = TrainConfig.load(Path(demo.DEMO_SAE_DIR) / "recipe.yaml")
    assert shipped.dataset == "wikitext2-valid.txt,tinyshakespeare.txt"
    resolved = with_corpus(shipped, corpus_dir)
    assert all(Path(p).is_file() for p in resolved.dataset.split(","))
    assert shipped_recipe(resolved) == shipped
    assert TrainConfig.load(RECIPE).dataset == shipped.dataset


def test_demo_default_is_the_strength_the_recorded_sweep_chose() -> None:
    """`llamascope steer --sae demo` steers a feature at the strength eval-steer chose on the
    selection half (bench/out/eval_steer_sweep_plain.json), one with a positive test-half lift,
    and the README's "What `make demo` shows" quotes that sweep's lift and perplexity."""
    root = Path(__file__).resolve().parents[2]
    sweep = json.loads((root / "bench/out/eval_steer_sweep_plain.json").read_text())
    by_feature = {f["feature"]: f for f in sweep["features"]}
    default = demo.DEMO_FEATURE
    assert default.index in by_feature, sorted(by_feature)
    chosen = by_feature[default.index]["chosen"]["feature"]
    assert chosen["strength"] == default.strength == demo.DEMO_STRENGTH
    assert chosen["concept_lift"] > 0
    unsteered = next(p for p in by_feature[default.index]["curves"]["feature"]
                     if p["strength"] == 0)
    readme = (root / "README.md").read_text(encoding="utf-8")
    shows = readme[readme.index("**What `make demo` shows.**"):][:2000]
    assert f"feature {default.index}" in shows and f"length {default.strength:g}" in shows
    assert f"{chosen['concept_lift']:+.2f} nats" in shows
    assert f"perplexity {chosen['perplexity']:.2f} ({unsteered['perplexity']:.2f} unsteered)" in shows
