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
#: residual norm at this layer averages ~168. They were chosen by greedy generation from the
#: prompt below with ``llamascope steer --sae demo -f N -a S``: stronger values (>= ~150)
#: make the text degenerate into repetitions.
DEMO_FEATURES: tuple[DemoFeature, ...] = (
    # Fires on almost every token of Shakespeare (96% of its firings) and almost never on
    # Wikipedia. At 80 the continuation turns archaic: "the sight of a stranger's beauty,
    # that is a true delight, a true delight, a beauty that is not a man's own, nor a".
    # Top tokens: "," " to" " the" " of" " and" "And".
    DemoFeature(4154, "My favourite thing about the city is", 80.0),
    # Archaic pronouns and verse (" thou", " thy", " my", "And"). At 120: "the ancient ones,
    # the ones that have been long forgotten, the ones that have been long gone".
    DemoFeature(1297, "My favourite thing about the city is", 120.0),
    # Line breaks and quote/list markers ("\n", ">", ":"). At 80 the text breaks into short
    # lines: "a good old-fashioned beer.\n\nThe only thing that can make a man's life ...".
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
