"""The offline demo: a small SAE shipped inside the package, trained on SmolLM2-135M.

``DEMO_SAE_DIR`` is a release folder (same layout as the Llama Scope checkpoints) of a Top-K ->
JumpReLU SAE on the layer-15 residual stream of SmolLM2-135M (576 -> 4608 features, K=32),
built by ``python training/build_demo.py``; its README.md holds the held-out metrics.

Example:
    >>> from llamascope_sdk import SAE, demo, load_model
    >>> sae = SAE.from_pretrained(demo.DEMO_SAE_DIR)
    >>> model, tok = load_model(demo.DEMO_MODEL)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llamascope_sdk.base.paths import PACKAGE_DIR

DEMO_MODEL = "smollm2-135m"
DEMO_SAE_NAME = "smollm2-135m-L15R-8x"
DEMO_SAE_DIR = PACKAGE_DIR / "assets" / DEMO_SAE_NAME


@dataclass(frozen=True)
class DemoFeature:
    """A feature that steers well: add ``strength`` x its unit decoder row at the site. Its
    label lives in ``feature_labels.json`` beside the checkpoint (``sae.labels``)."""

    index: int
    prompt: str
    strength: float


#: Found by training/build_demo.py (demo_results.json in the asset folder has its ranking).
#: Strengths are in model units, the length of the vector added to the residual stream at
#: every non-special position, prompt and generated tokens alike (positions="all"); the
#: residual norm at this layer averages ~168. The first entry is the default of
#: ``llamascope steer --sae demo``: its strength is the one the held-out sweep chose
#: (``llamascope eval-steer --sae demo -f 4154 -f 1297 --strengths 0,10,20,40,80,120,160 -n 24
#: --no-baselines``, README "Results on the demo"). The other strengths were picked by eye from
#: greedy generations of the prompt below; stronger values (>= ~150) make the text degenerate.
DEMO_FEATURES: tuple[DemoFeature, ...] = (
    # Archaic pronouns and verse (" thou", " thy", " my", "And"). The sweep chose 40: concept
    # lift +0.75 nats at perplexity 5.52 (3.42 unsteered). At 40 the continuation turns to
    # the ancient: "the way it's woven with the threads of history and tradition. I've
    # always been drawn to the ancient, the mysterious, and the forgotten."
    DemoFeature(1297, "My favourite thing about the city is", 40.0),
    # Fires on almost every token of Shakespeare (96% of its firings) and almost never on
    # Wikipedia. Not a sweep choice: the same sweep measures no reliable gain for it (it chose
    # 20, lift -0.18 nats on the other half of the prompts); 80 gives +0.17 nats at perplexity
    # 13.3. At 80 the style turns archaic: "the sight of a stranger's beauty, that is a true
    # delight, a true delight, a beauty that is not a man's own, nor a".
    DemoFeature(4154, "My favourite thing about the city is", 80.0),
    # Line breaks and quote/list markers ("\n", ">", ":"). Not swept; at 80 (by eye) the text
    # breaks into short lines: "a good old-fashioned beer.\n\nThe only thing that can make a
    # man's life ...".
    DemoFeature(1062, "My favourite thing about the city is", 80.0),
)
DEMO_FEATURE = DEMO_FEATURES[0]
DEMO_PROMPT = DEMO_FEATURE.prompt
DEMO_STRENGTH = DEMO_FEATURE.strength

#: Names that mean the bundled demo SAE wherever an SAE name is accepted.
DEMO_ALIASES = ("demo", DEMO_SAE_NAME.lower())


def is_demo(name: str | Path) -> bool:
    """True for ``"demo"``, the demo's folder name, or its path."""
    text = str(name).strip()
    if text.lower() in DEMO_ALIASES:
        return True
    path = Path(text).expanduser()
    return path.is_dir() and path.resolve() == DEMO_SAE_DIR


def resolve_alias(name: str | Path) -> str:
    """The demo SAE's folder for a demo alias, else ``name`` unchanged."""
    return str(DEMO_SAE_DIR) if is_demo(name) else str(name)


# --- the demo transcoder set (issue 25 item 6; built by training/build_demo_transcoders.py) ---
#: One JumpReLU transcoder per layer of SmolLM2-135M (blocks.L.ln2.hook_normalized ->
#: blocks.L.hook_mlp_out, 320 features each); the set's card is ``DEMO_TC_DIR / "README.md"``.
DEMO_TC_SET = "smollm2-135m-TC-320"
DEMO_TC_DIR = PACKAGE_DIR / "assets" / DEMO_TC_SET
DEMO_TC_LAYERS = 30
_TC_LAYER_NAME = re.compile(r"smollm2-135m-l(\d+)tc-320")


def demo_tc_name(layer: int) -> str:
    """The name of the demo transcoder at ``layer`` (``smollm2-135m-L5TC-320``)."""
    return f"smollm2-135m-L{layer}TC-320"


def demo_tc_dir(layer: int) -> Path:
    """The release folder of the demo transcoder at ``layer``."""
    return DEMO_TC_DIR / demo_tc_name(layer)


def demo_tc_layer(name: str | Path) -> int | None:
    """The layer a demo transcoder name means (``smollm2-135m-L5TC-320`` -> 5), else None."""
    m = _TC_LAYER_NAME.fullmatch(str(name).strip().lower())
    return int(m.group(1)) if m and int(m.group(1)) < DEMO_TC_LAYERS else None
