"""Pruning, files, the viewer JSON, the HTML view and the paths text of an attribution graph.

Pruning is checked against circuit-tracer's definition written out plainly here on the square
adjacency matrix (dense power series, a sort for every threshold), which the SDK avoids.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from llamascope_sdk.base.errors import CorruptCheckpointError, FolderNotOwnedError
from llamascope_sdk.trace import Graph, attribute, prune
from llamascope_sdk.trace.export import NODE_FIELDS, feature_notes, viewer_json
from llamascope_sdk.trace.files import check_trace_target, save_trace
from llamascope_sdk.trace.html import render
from llamascope_sdk.trace.influence import threshold_for_fraction
from llamascope_sdk.trace.paths import paths_text, strongest_paths
from tests.test_trace import IDS, N_LAYERS, tiny_model, transcoders


@pytest.fixture(scope="module")
def graph_and_tcs() -> tuple[Graph, list]:
    model = tiny_model(torch.float32)
    tcs = transcoders(list(range(N_LAYERS)), torch.float32)
    tcs[1].labels = {int(f): f"label of L1 feature {int(f)}" for f in range(tcs[1].d_sae)}
    return attribute(model, tcs, IDS, batch_size=64, max_feature_nodes=120), tcs


# ------------------------------------------------------------------ circuit-tracer, plainly
def _normalise(a: torch.Tensor) -> torch.Tensor:
    m = a.abs()
    return m / m.sum(1, keepdim=True).clamp(min=1e-10)


def _influence(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w A + w A^2 + ... by the power series."""
    total, cur = torch.zeros_like(w), w @ a
    while cur.any():
        total, cur = total + cur, cur @ a
    return total


def _threshold(scores: torch.Tensor, fraction: float) -> float:
    s = torch.sort(scores.flatten(), descending=True).values
    cum = torch.cumsum(s.double(), 0) / s.double().sum()
    i = min(int(torch.searchsorted(cum, fraction)), len(s) - 1)
    return float(s[i])


def reference_prune(adj: torch.Tensor, g: Graph, node_t: float, edge_t: float):
    w = torch.zeros(adj.shape[0])
    w[g.logit_offset:] = g.logit_probs_K
    infl = _influence(_normalise(adj), w)
    node = infl >= _threshold(infl, node_t)
    node[g.token_offset:] = True
    pruned = adj.clone()
    pruned[~node] = 0
    pruned[:, ~node] = 0
    norm = _normalise(pruned)
    scores = norm * (_influence(norm, w) + w)[:, None]
    edge = scores >= _threshold(scores, edge_t)
    ncols, nf = g.token_offset, g.n_features
    while True:
        old = node.clone()
        node[:ncols] &= edge[:, :ncols].any(0)
        node[:nf] &= edge[:nf].any(1)
        edge[~node] = False
        edge[:, ~node] = False
        if torch.equal(old, node):
            return node, edge, infl


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("node_t,edge_t", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.995)])
def test_prune_matches_circuit_tracer_definition(graph_and_tcs, node_t, edge_t) -> None:
    g, _ = graph_and_tcs
    adj = g.adjacency_matrix()
    node, edge, infl = reference_prune(adj, g, node_t, edge_t)
    got = prune(g, node_t, edge_t)
    torch.testing.assert_close(got.node_influence, infl, rtol=1e-4, atol=1e-7)
    assert torch.equal(got.node_mask, node)
    square = torch.zeros_like(edge)
    square[g.row_nodes(), : g.logit_offset] = got.edge_mask_RC
    assert torch.equal(square, edge)
    assert 0 < int(node[: g.n_features].sum()) < g.n_features


def test_threshold_one_keeps_every_node(graph_and_tcs) -> None:
    """1.0 keeps everything (circuit-tracer's float32 cumsum makes 1.0 depend on rounding)."""
    g, _ = graph_and_tcs
    got = prune(g, 1.0, 1.0)
    assert bool(got.node_mask[g.token_offset:].all())
    assert int(got.node_mask[: g.n_features].sum()) == int(
        (got.edge_mask_RC[:, : g.n_features].any(0) & got.edge_mask_RC[: g.n_features].any(1)).sum())


def test_prune_refuses_thresholds_outside_unit_interval(graph_and_tcs) -> None:
    g, _ = graph_and_tcs
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
            prune(g, bad, 0.98)


def test_threshold_without_sort_equals_sorted_cumsum() -> None:
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        x = torch.rand(500, generator=gen) ** 4
        if trial % 2:
            x = torch.round(x * 20) / 20  # many ties and zeros
        for frac in (0.1, 0.5, 0.8, 0.98, 0.999):
            chunks = list(x.split(37))
            got = threshold_for_fraction(lambda c=chunks: iter(c), frac)  # type: ignore[misc]
            assert got == _threshold(x, frac)


def test_graph_round_trip_and_refusals(graph_and_tcs, tmp_path) -> None:
    g, _ = graph_and_tcs
    out = save_trace(tmp_path / "t", g)
    back = Graph.load(out)
    for key, val in g.tensors().items():
        assert torch.equal(back.tensors()[key], val), key
    assert back.metadata() == g.metadata()
    assert not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))
    meta = json.loads((out / "graph.json").read_text())
    (out / "graph.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(CorruptCheckpointError, match="format"):
        Graph.load(out)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FolderNotOwnedError):
        check_trace_target(mine)
    with pytest.raises(FolderNotOwnedError):
        save_trace(mine, g)
    assert (mine / "notes.txt").read_text() == "keep me"
    again = save_trace(tmp_path / "t2", g)
    save_trace(again, g)  # an earlier trace output is replaced
    (again / "extra.txt").write_text("x")
    with pytest.raises(FolderNotOwnedError, match="did not write"):
        check_trace_target(again)


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: Literal["cross layer transcoder", "mlp reconstruction error", "embedding",
                          "logit"]
    token_prob: float
    is_target_logit: bool
    run_idx: int
    reverse_ctx_idx: int
    jsNodeId: str
    clerp: str
    influence: float | None
    activation: float | None


class _Link(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    source: str
    target: str
    weight: float


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None
    schema_version: int


def test_viewer_json_follows_circuit_tracer_schema(graph_and_tcs) -> None:
    g, tcs = graph_and_tcs
    pr = prune(g)
    notes = feature_notes(g, dict(enumerate(tcs)))
    doc = json.loads(json.dumps(viewer_json(g, pr, slug="t", notes=notes)))
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    meta = _Meta(**doc["metadata"])
    assert meta.prompt_tokens == g.token_strings and meta.schema_version == 1
    nodes = [_Node(**n) for n in doc["nodes"]]
    assert tuple(doc["nodes"][0]) == NODE_FIELDS
    ids = {n.node_id: n for n in nodes}
    assert len(ids) == len(nodes)
    links = [_Link(**link) for link in doc["links"]]
    assert links and all(x.source in ids and x.target in ids for x in links)
    # every link weight is the graph's edge between the nodes its ids name
    feats = {f"{la}_{fe}_{po}": i for i, (la, po, fe) in enumerate(g.features_F3.tolist())}
    top = g.logit_tokens_K[0].item()
    for x in links:
        if x.target == f"{N_LAYERS + 1}_{top}_{g.n_pos - 1}" and x.source in feats:
            assert x.weight == pytest.approx(float(g.edges_RC[g.n_features, feats[x.source]]))
    logits = [n for n in nodes if n.feature_type == "logit"]
    assert len(logits) == g.n_logits and sum(n.is_target_logit for n in logits) == 1
    assert sum(n.feature_type == "embedding" for n in nodes) == g.n_pos
    l1 = [n for n in nodes if n.feature_type == "cross layer transcoder" and n.layer == "1"]
    assert l1 and all(re.fullmatch(r"label of L1 feature \d+", n.clerp) for n in l1)
    assert all(n.clerp == "" for n in nodes if n.layer == "0")
    for n in nodes:
        if n.feature_type == "cross layer transcoder":
            layer, feat, _pos = (int(v) for v in n.node_id.split("_"))
            assert n.feature == (layer + feat) * (layer + feat + 1) // 2 + feat


def test_html_view_is_self_contained(graph_and_tcs) -> None:
    g, tcs = graph_and_tcs
    pr = prune(g)
    notes = feature_notes(g, dict(enumerate(tcs)))
    viewer = viewer_json(g, pr, slug="t", notes=notes)
    page = render(viewer, g.n_layers, notes)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "import(" not in page and "fetch(" not in page
    data = re.search(r"<script type='application/json' id='graph-data'>(.*?)</script>", page, re.S)
    assert data is not None
    embedded = json.loads(data.group(1).replace("<\\/", "</"))
    assert embedded["graph"] == json.loads(json.dumps(viewer))
    steer = [n["steer"] for n in embedded["notes"].values()]
    assert steer and all(s.startswith("llamascope steer --sae ") and " -f " in s for s in steer)


def _all_paths(g: Graph, mask_RC: torch.Tensor, node: int) -> list[tuple[float, list[int]]]:
    """Every kept path into ``node`` by depth-first search (tiny graphs only)."""
    rows = {int(n): r for r, n in enumerate(g.row_nodes().tolist())}
    if node not in rows or not bool(mask_RC[rows[node]].any()):
        return [(1.0, [node])]
    r = rows[node]
    total = float(g.edges_RC[r].abs().sum())
    out = []
    for c in mask_RC[r].nonzero().flatten().tolist():
        share = abs(float(g.edges_RC[r, c])) / total
        out += [(s * share, p + [node]) for s, p in _all_paths(g, mask_RC, c)]
    return out


def test_strongest_paths_are_the_best_of_all_paths(graph_and_tcs) -> None:
    g, _ = graph_and_tcs
    pr = prune(g, 0.5, 0.8)
    want = sorted(_all_paths(g, pr.edge_mask_RC, g.logit_offset), key=lambda p: -p[0])[:5]
    got = strongest_paths(g, pr, k=5)
    assert [round(s, 9) for s, _ in got] == [round(s, 9) for s, _ in want]
    assert [[n for n, _ in p] + [g.logit_offset] for _, p in got][0] == want[0][1]
    text = paths_text(g, pr)
    assert text.count("\n") == 1 + len(got) and "logit" in text.splitlines()[1]
