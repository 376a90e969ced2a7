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

from pathlib import Path
from typing import NamedTuple

DEMO_MODEL = "smollm2-135m"
DEMO_SAE_NAME = "smollm2-135m-L15R-8x"
DEMO_SAE_DIR = Path(__file__).resolve().parent / "assets" / DEMO_SAE_NAME
#: The hook point the demo SAE reads and writes (output of model.model.layers[15]).
DEMO_HOOK_POINT = "blocks.15.hook_resid_post"


class DemoFeature(NamedTuple):
    """A feature that steers well: add ``strength`` x its unit decoder row at the site."""

    index: int
    label: str
    top_tokens: tuple[str, ...]
    prompt: str
    strength: float


#: Found by training/build_demo.py (demo_results.json in the asset folder has the full
#: steering grid). Strengths are in model units (the residual norm here averages ~168) and
#: are 4x / 2x / 8x the feature's largest activation on the training cache.
DEMO_FEATURES: tuple[DemoFeature, ...] = (
    # Fires on almost every token of Shakespeare (96% of its firings) and almost never on
    # Wikipedia. Greedy continuation of the prompt turns into Early Modern English:
    # "..., I have not, ever, been so merry. I am but a wanderer, a wanderer".
    DemoFeature(4154, "Shakespeare / Early Modern English style",
                (",", " to", " the", " of", " and", "And"),
                "My favourite thing about the city is", 635.6),
    # Archaic second-person pronouns and verse: " thou", " thy", " my", "And".
    DemoFeature(1297, "archaic pronouns (thou, thy)",
                (" thou", " I", " to", " thy", " you", " my"),
                "My favourite thing about the city is", 315.9),
    # Line breaks and quote/list markers ("\n", ">", ":"); steering makes list-formatted text:
    # "* **A sense of community**\n* **A chance to share experiences**".
    DemoFeature(1062, "line break / list structure", ("\n", ">", ":"),
                "My favourite thing about the city is", 224.7),
)
DEMO_FEATURE = DEMO_FEATURES[0]
DEMO_PROMPT = DEMO_FEATURE.prompt
DEMO_STRENGTH = DEMO_FEATURE.strength
