"""The demo transcoder set of SmolLM2-135M and the feature stores its graph nodes link to.

The set (issue 25 item 6) is shipped inside the package: one JumpReLU transcoder per layer
(30 layers, ``blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out``, 320 features each,
bf16), trained by ``python training/build_demo_transcoders.py`` with the SDK's training package
and the recipe ``training/recipes/smollm2-135m-TC-demo.yaml``. Its card, with the measured
reconstruction quality, is ``DEMO_TC_DIR / "README.md"``. ``demo`` (or ``smollm2-135m-tc-320``)
names the whole set where a transcoder set is asked for (``llamascope trace --transcoders
demo``); each layer also loads by name (``SAE.from_pretrained("smollm2-135m-L5TC-320")``).

The feature stores are built on first use by :func:`demo_stores` with the SDK's
:func:`~llamascope_sdk.mining.mine.mine` over the repository's own text
(``tests/data/corpus``: WikiText-2 and Tiny Shakespeare excerpts) and cached, one store per
layer, where every other store of that name lives (``$LLAMASCOPE_CACHE/features/<name>``):
each store is written whole in one step, and the build holds a lock, so concurrent callers
mine once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamascope_sdk.base.atomic import file_lock
from llamascope_sdk.base.errors import (
    CorruptCheckpointError,
    DataFileNotFoundError,
    IncompatibleModelError,
)
from llamascope_sdk.base.paths import PACKAGE_DIR, cache_root
from llamascope_sdk.loading.demo import (
    DEMO_MODEL,
    DEMO_TC_DIR,
    DEMO_TC_LAYERS,
    DEMO_TC_SET,
    demo_tc_dir,
    demo_tc_name,
)
from llamascope_sdk.loading.models import load_model, model_device
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.mining.mine import mine
from llamascope_sdk.store.feature_store import FeatureStore, default_store_dir

#: Names that mean the demo transcoder set where a set is asked for.
DEMO_TRANSCODERS_ALIASES = ("demo", DEMO_TC_SET.lower())
#: The model the set was trained on (hidden size 576, 30 layers).
DEMO_TC_MODEL = DEMO_MODEL
#: The repository's own text the stores are mined from (present in a clone, not in a wheel).
DEMO_CORPUS_DIR = PACKAGE_DIR.parent / "tests" / "data" / "corpus"
DEMO_CORPUS_FILES = ("wikitext2-valid.txt", "tinyshakespeare.txt")
#: Mining settings of the demo stores (the whole excerpt corpus is about 9,000 tokens).
STORE_TOKENS, STORE_CONTEXT = 20_000, 128


def is_demo_transcoders(name: str | Path) -> bool:
    """True for ``demo``, ``smollm2-135m-TC-320`` (any case) or the set's folder."""
    text = str(name).strip()
    if text.lower() in DEMO_TRANSCODERS_ALIASES:
        return True
    path = Path(text).expanduser()
    return path.is_dir() and path.resolve() == DEMO_TC_DIR.resolve()


def check_demo_model(model: nn.Module) -> None:
    """The set fits SmolLM2-135M's shape only.

    Raises:
        IncompatibleModelError: another hidden size or number of layers (one line).
    """
    cfg = getattr(model, "config", None)
    got = (getattr(cfg, "hidden_size", None), getattr(cfg, "num_hidden_layers", None))
    if got != (576, DEMO_TC_LAYERS):
        raise IncompatibleModelError(
            f"the demo transcoders ({DEMO_TC_SET}) need SmolLM2-135M (hidden_size 576, "
            f"{DEMO_TC_LAYERS} layers); this model has hidden_size {got[0]}, {got[1]} layers "
            f"(load it with load_model({DEMO_TC_MODEL!r}))")


def demo_transcoders(model: nn.Module | None = None, *, device: torch.device | str | None = None,
                     dtype: torch.dtype | str | None = None) -> list[SAE]:
    """The 30 demo transcoders, layer 0 first, in fp32 (or ``dtype``).

    Args:
        model: when given, checked to be SmolLM2-135M-shaped; the transcoders go to its device
            unless ``device`` says otherwise.

    Raises:
        IncompatibleModelError: ``model`` is not SmolLM2-135M-shaped.
        CorruptCheckpointError: the shipped files are missing (a broken install).
    """
    if model is not None:
        check_demo_model(model)
        device = device if device is not None else model_device(model)
    missing = [L for L in range(DEMO_TC_LAYERS) if not (demo_tc_dir(L) / "hyperparams.json").is_file()]
    if missing:
        raise CorruptCheckpointError(f"the demo transcoder set in {DEMO_TC_DIR} lacks layers "
                                     f"{missing}; reinstall llamascope-sdk (the set ships with it)")
    return [SAE.from_pretrained(demo_tc_name(L), device=device, dtype=dtype)
            for L in range(DEMO_TC_LAYERS)]


def demo_store_dirs() -> list[Path]:
    """Where the 30 demo stores are cached (``$LLAMASCOPE_CACHE/features/<layer name>``)."""
    return [default_store_dir(demo_tc_name(L)) for L in range(DEMO_TC_LAYERS)]


def _load_complete(folder: Path) -> FeatureStore | None:
    try:
        return FeatureStore.load(folder)
    except (FileNotFoundError, ValueError):  # IncompleteStoreError, CorruptCheckpointError
        return None


def demo_corpus(corpus: str | Path | None = None) -> str:
    """The corpus the stores are mined from: ``corpus`` or the repository's excerpts.

    Raises:
        DataFileNotFoundError: the excerpts are missing (an installed wheel has no tests/).
    """
    if corpus is not None:
        return str(corpus)
    files = [DEMO_CORPUS_DIR / n for n in DEMO_CORPUS_FILES]
    if not all(f.is_file() for f in files):
        raise DataFileNotFoundError(f"the demo stores are mined from {DEMO_CORPUS_DIR}, which "
                                    "this installation lacks; pass corpus=PATH (a .txt/.jsonl "
                                    "file) or mine from a clone of the repository")
    return ",".join(str(f) for f in files)


def demo_stores(model: nn.Module | None = None, tokenizer: Any = None, *,
                corpus: str | Path | None = None,
                progress: bool = False) -> dict[int, FeatureStore]:
    """``{layer: feature store}`` of every demo transcoder (the form the graph exports take),
    mined once and cached.

    Stores already cached are loaded; the missing ones are mined together in one pass
    (about a minute on a 2-core CPU) under a lock, and each is saved whole in one step.
    ``model``/``tokenizer`` default to SmolLM2-135M, loaded only when something is mined.
    """
    dirs = demo_store_dirs()
    with file_lock(cache_root() / "features" / f"{DEMO_TC_SET}.lock"):
        stores = [_load_complete(d) for d in dirs]
        todo = [L for L, s in enumerate(stores) if s is None]
        if todo:
            for L, store in zip(todo, _mine(todo, model, tokenizer, corpus, progress), strict=True):
                store.save(dirs[L])  # whole, in one step
                stores[L] = store
    return {L: s for L, s in enumerate(stores) if s is not None}


def _mine(layers: list[int], model: nn.Module | None, tokenizer: Any, corpus: str | Path | None,
          progress: bool) -> list[FeatureStore]:
    text = demo_corpus(corpus)
    if model is None or tokenizer is None:
        model, tokenizer = load_model(DEMO_TC_MODEL)
    check_demo_model(model)
    saes = demo_transcoders(model)
    named = {demo_tc_name(L): saes[L] for L in layers}
    results = mine(model, tokenizer, named, text, tokens=STORE_TOKENS, context=STORE_CONTEXT,
                   progress=progress)
    label = "tests/data/corpus (WikiText-2 + Tiny Shakespeare excerpts)" if corpus is None else str(corpus)
    return [FeatureStore.from_result(results[n], tokenizer, model=model, sae_spec=n, corpus=label,
                                     model_name=DEMO_TC_MODEL) for n in named]
