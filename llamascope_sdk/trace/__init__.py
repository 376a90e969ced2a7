"""Attribution graphs over transcoders (``llamascope trace``): circuit-tracer's definition for
per-layer transcoders on a plain transformers Llama, with every edge a direct effect in the
frozen local replacement model. docs/trace.md has the definition and the memory formula.

- :func:`attribute` computes a :class:`Graph` for one prompt;
- :func:`prune` keeps the nodes and edges that carry most of the influence on the logits;
- :mod:`.demo` holds the demo transcoder set of SmolLM2-135M (``demo_transcoders``) and its
  feature stores; :mod:`.quality` measures a set with every MLP replaced at once.
"""

from llamascope_sdk.trace.attribute import attribute
from llamascope_sdk.trace.graph import Graph
from llamascope_sdk.trace.influence import PruneResult, node_influence, prune

__all__ = ["Graph", "PruneResult", "attribute", "node_influence", "prune"]
