"""A pruned graph as the JSON that circuit-tracer's local viewer and Neuronpedia read, and what
is known about each feature node (label, examples, page, steer command).

Schema (circuit-tracer ``frontend/graph_models.py``, schema_version 1)::

    {"metadata": {"slug", "scan", "transcoder_list": [str], "prompt_tokens": [str], "prompt",
                  "node_threshold", "schema_version": 1},
     "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                 "sg_pos": ""},
     "nodes": [{"node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
                "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
                "influence", "activation"}],
     "links": [{"source", "target", "weight"}]}

Node ids: a feature ``"{layer}_{feature}_{pos}"`` (``feature`` = Cantor pairing of layer and
feature index), an error ``"0_{layer}_{pos}"`` (feature -1), a token ``"E_{token id}_{pos}"``
(layer "E"), a logit ``"{n_layers + 1}_{token id}_{last pos}"``. ``feature_type``: "cross layer
transcoder" (the viewers' name for any transcoder feature), "mlp reconstruction error",
"embedding", "logit". ``influence`` is the node's cumulative influence fraction (the share of
total influence held by nodes ranked at or above it), as circuit-tracer writes it. A link
``weight`` is the edge: the direct effect of source on target.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.store.explanations import descriptions, label_text
from llamascope_sdk.store.feature_store import FeatureStore
from llamascope_sdk.store.view import steer_command, store_steer_command
from llamascope_sdk.trace.graph import Graph
from llamascope_sdk.trace.influence import PruneResult

SCHEMA_VERSION = 1
NODE_FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "token_prob",
               "is_target_logit", "run_idx", "reverse_ctx_idx", "jsNodeId", "clerp",
               "influence", "activation")


@dataclass
class FeatureNote:
    """What the viewers show about one feature (layer, index)."""

    label: str = ""
    examples: list[dict[str, Any]] = field(default_factory=list)
    page: str | None = None
    steer: str | None = None


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0,
                            "reverse_ctx_idx": 0, "clerp": "", "influence": None,
                            "activation": None}
    base.update(kw)
    return {k: base[k] for k in NODE_FIELDS}


def node_record(graph: Graph, node: int, influence: float,
                notes: Mapping[tuple[int, int], FeatureNote]) -> dict[str, Any]:
    """One node of the viewer JSON."""
    kind = graph.node_kind(node)
    if kind == "feature":
        layer, pos, feat = (int(v) for v in graph.features_F3[node])
        note = notes.get((layer, feat))
        return _node(node_id=f"{layer}_{feat}_{pos}", feature=_cantor(layer, feat),
                     layer=str(layer), ctx_idx=pos, feature_type="cross layer transcoder",
                     jsNodeId=f"{layer}_{feat}-0", influence=influence,
                     activation=float(graph.feature_activations_F[node]),
                     clerp=note.label if note else "")
    if kind == "error":
        layer, pos = divmod(node - graph.error_offset, graph.n_pos)
        return _node(node_id=f"0_{layer}_{pos}", feature=-1, layer=str(layer), ctx_idx=pos,
                     feature_type="mlp reconstruction error", jsNodeId=f"{layer}_{pos}-0",
                     influence=influence)
    if kind == "token":
        pos = node - graph.token_offset
        tok = int(graph.input_tokens_T[pos])
        return _node(node_id=f"E_{tok}_{pos}", feature=pos, layer="E", ctx_idx=pos,
                     feature_type="embedding", jsNodeId=f"E_{tok}-{pos}", influence=influence)
    k = node - graph.logit_offset
    tok, prob, pos = int(graph.logit_tokens_K[k]), float(graph.logit_probs_K[k]), graph.n_pos - 1
    top = str(graph.n_layers + 1)
    return _node(node_id=f"{top}_{tok}_{pos}", feature=tok, layer=top, ctx_idx=pos,
                 feature_type="logit", token_prob=prob, is_target_logit=k == 0,
                 jsNodeId=f"L_{tok}-{pos}",
                 clerp=f'Output "{graph.logit_strings[k]}" (p={prob:.3f})')


def viewer_json(graph: Graph, pruned: PruneResult, *, slug: str, scan: str | None = None,
                node_threshold: float = 0.8,
                notes: Mapping[tuple[int, int], FeatureNote] | None = None) -> dict[str, Any]:
    """The graph JSON of circuit-tracer's viewer / Neuronpedia (module docstring): kept nodes,
    kept edges between them, tokens and logits always."""
    notes = notes or {}
    kept = pruned.node_mask.nonzero().flatten().tolist()
    nodes = {n: node_record(graph, n, float(pruned.cumulative[n]), notes) for n in kept}
    rows = graph.row_nodes()
    links: list[dict[str, Any]] = []
    used: set[int] = set()
    dst_r, src_c = pruned.edge_mask_RC.nonzero(as_tuple=True)
    for r, c in zip(dst_r.tolist(), src_c.tolist(), strict=True):
        dst = int(rows[r])
        if dst in nodes and c in nodes:
            links.append({"source": nodes[c]["node_id"], "target": nodes[dst]["node_id"],
                          "weight": float(graph.edges_RC[r, c])})
            used.update((c, dst))
    keep_types = ("embedding", "logit")
    node_list = [rec for n, rec in nodes.items() if n in used or rec["feature_type"] in keep_types]
    names = list(graph.transcoder_names)
    meta = {"slug": slug, "scan": scan or (names[0] if len(set(names)) == 1 else "custom"),
            "transcoder_list": names, "prompt_tokens": list(graph.token_strings),
            "prompt": graph.prompt, "node_threshold": node_threshold,
            "schema_version": SCHEMA_VERSION}
    return {"metadata": meta,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": node_list, "links": links}


def feature_notes(graph: Graph, transcoders: Mapping[int, SAE],
                  stores: Mapping[int, FeatureStore] | None = None, *,
                  n_examples: int = 3) -> dict[tuple[int, int], FeatureNote]:
    """Label, examples, page and steer command of every feature node, from the layer's feature
    store when given (best explanation, else its labels; examples; its HTML page when
    written), else from the transcoder's own labels. The steer command uses the store's
    statistics, else 4x this graph's activation in model units."""
    stores = stores or {}
    expl = {layer: descriptions(s.path) for layer, s in stores.items() if s.path is not None}
    out: dict[tuple[int, int], FeatureNote] = {}
    for node in range(graph.n_features):
        layer, _pos, feat = (int(v) for v in graph.features_F3[node])
        if (layer, feat) in out:
            continue
        store, sae = stores.get(layer), transcoders.get(layer)
        note = FeatureNote()
        rec = expl.get(layer, {}).get(feat)
        if rec is not None:
            note.label = label_text(rec)
        elif store is not None and feat in store.labels:
            note.label = store.labels[feat]
        elif sae is not None:
            note.label = sae.labels.get(feat, "")
        if store is not None:
            note.examples = store.examples(feat)[:n_examples]
            page = store.path / "pages" / "features" / f"{feat}.html" if store.path else None
            note.page = str(page.resolve()) if page is not None and page.is_file() else None
            note.steer = store_steer_command(store, feat)
        if note.steer is None and sae is not None:
            note.steer = steer_command(_spec(sae), feat, relative=False,
                                       typical=float(graph.feature_activations_F[node]))
        out[(layer, feat)] = note
    return out


def _spec(sae: SAE) -> str:
    """How the CLI names this transcoder: its folder when loaded from one, else its name."""
    path = getattr(sae.source, "path", None)
    return str(Path(path)) if path else sae.name
