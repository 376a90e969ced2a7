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
