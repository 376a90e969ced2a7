"""Attribution graphs, checked against an independent frozen forward written plainly here.

The reference (:func:`plain_forward`) is a Llama forward in a few lines of tensor algebra on
the model's weights: RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP, final norm,
unembedding. It is first checked against transformers' own logits; its frozen mode takes the
prompt's norm scales, attention patterns and MLP outputs as constants, so that removing one
source (a feature's decoder contribution, an error vector, a token embedding) and measuring
every target's input gives the direct effects by intervention. Nothing here calls the
attribution code except to get the graph being checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.trace import attribute
from llamascope_sdk.trace.frozen import frozen_forward
from tests.helpers import tiny_sae

N_LAYERS = 3
IDS = torch.tensor([1, 17, 5, 42, 9, 30, 11])


def tiny_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a forgotten gain cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
    return model.to(dtype)


def transcoders(layers: list[int], dtype: torch.dtype = torch.float64) -> list[SAE]:
    return [tiny_sae(layer=layer, position="TC", seed=10 + layer, d_sae=96,
                     threshold=0.9).to(dtype) for layer in layers]


# ------------------------------------------------------------------ the plain reference
@dataclass
class Run:
    """What one plain forward computed (batch S)."""

    logits: torch.Tensor  # [S, T, V]
    x_in: list[torch.Tensor] = field(default_factory=list)  # per layer [S, T, D], no gain
    scales: list[torch.Tensor] = field(default_factory=list)  # norm scales, forward order
    patterns: list[torch.Tensor] = field(default_factory=list)  # per layer [S, H, T, T]
    mlp_out: list[torch.Tensor] = field(default_factory=list)  # per layer [S, T, D]


def _scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _attention(block, n: torch.Tensor, cos, sin, pattern) -> tuple[torch.Tensor, torch.Tensor]:
    a = block.self_attn
    s, t, _ = n.shape
    hd = a.head_dim
    q = (n @ a.q_proj.weight.T).view(s, t, -1, hd).transpose(1, 2)
    k = (n @ a.k_proj.weight.T).view(s, t, -1, hd).transpose(1, 2)
    v = (n @ a.v_proj.weight.T).view(s, t, -1, hd).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if pattern is None:
        scores = q @ k.transpose(-1, -2) / hd ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        pattern = torch.softmax(scores.masked_fill(causal, float("-inf")), -1)
    out = (pattern @ v).transpose(1, 2).reshape(s, t, -1)
    return out @ a.o_proj.weight.T, pattern


def plain_forward(model, ids: torch.Tensor, *, frozen: Run | None = None,
                  mlp_delta: list[torch.Tensor] | None = None,
                  embed_delta: torch.Tensor | None = None) -> Run:
    """The model on ``ids`` ([T]); with ``frozen``, its scales, patterns and MLP outputs are
    used as constants (MLP outputs minus ``mlp_delta[l]`` [S, T, D]); ``embed_delta`` [S, T, D]
    is subtracted from the token embeddings. S = the deltas' batch (1 without them)."""
    m = model.model
    h = m.embed_tokens.weight[ids][None]
    if embed_delta is not None:
        h = h - embed_delta
    s = h.shape[0] if mlp_delta is None else mlp_delta[0].shape[0]
    h = h.expand(s, -1, -1)
    pos = torch.arange(ids.numel())[None]
    cos, sin = m.rotary_emb(h, pos)
    cos, sin = cos[:, None], sin[:, None]
    run = Run(logits=torch.empty(0))
    scales = iter(frozen.scales) if frozen else None

    def norm(x, module):
        sc = next(scales) if scales else _scale(x, module.variance_epsilon)
        run.scales.append(sc)
        return x * sc, module.weight
    for layer, block in enumerate(m.layers):
        n, w = norm(h, block.input_layernorm)
        att, pattern = _attention(block, n * w, cos, sin, frozen.patterns[layer] if frozen else None)
        run.patterns.append(pattern)
        h = h + att
        x_in, w = norm(h, block.post_attention_layernorm)
        run.x_in.append(x_in)
        if frozen is None:
            mlp = block.mlp
            z = x_in * w
            y = (torch.nn.functional.silu(z @ mlp.gate_proj.weight.T) * (z @ mlp.up_proj.weight.T)
                 ) @ mlp.down_proj.weight.T
        else:
            y = frozen.mlp_out[layer] - (mlp_delta[layer] if mlp_delta is not None else 0)
        run.mlp_out.append(y)
        h = h + y
    n, w = norm(h, m.norm)
    run.logits = (n * w) @ model.lm_head.weight.T
    return run


# ------------------------------------------------------------------ sources, by intervention
def _sources(model, tcs: dict[int, SAE], base: Run) -> tuple[list, list[torch.Tensor], torch.Tensor]:
    """Every source of the graph's node order with its removal: (names, mlp deltas, embed
    delta). Features and errors recomputed here from the plain forward's transcoder inputs."""
    t, d = IDS.numel(), model.config.hidden_size
    names, per_layer, feats = [], [], {}
    for layer in range(N_LAYERS):
        x = base.x_in[layer][0]
        if layer in tcs:
            acts = tcs[layer].encode(x)
            acts[0] = 0
            err = base.mlp_out[layer][0] - tcs[layer].decode(acts)
            feats[layer] = acts
        else:
            err = base.mlp_out[layer][0].clone()
        err[0] = 0
        per_layer.append(err)
    deltas: list[list[torch.Tensor]] = [[] for _ in range(N_LAYERS)]
    emb = []

    def add(layer: int | None, pos: int, vec: torch.Tensor) -> None:
        for lay in range(N_LAYERS):
            z = torch.zeros(t, d, dtype=vec.dtype)
            if lay == layer:
                z[pos] = vec
            deltas[lay].append(z)
        z = torch.zeros(t, d, dtype=vec.dtype)
        if layer is None:
            z[pos] = vec
        emb.append(z)
    for layer in sorted(feats):
        for pos, f in feats[layer].nonzero().tolist():
            names.append(("feature", layer, pos, f, float(feats[layer][pos, f])))
            add(layer, pos, feats[layer][pos, f] * tcs[layer].W_dec[f])
    for layer in range(N_LAYERS):
        for pos in range(t):
            names.append(("error", layer, pos))
            add(layer, pos, per_layer[layer][pos])
    wte = model.model.embed_tokens.weight
    for pos in range(t):
        names.append(("token", pos))
        add(None, pos, wte[IDS[pos]])
    return names, [torch.stack(d_) for d_ in deltas], torch.stack(emb)


def _target_inputs(run: Run, graph, tcs: dict[int, SAE]) -> torch.Tensor:
    """[S, rows]: each target's input in every run: w_enc . x_in for features,
    logit - mean logit at the last position for logits."""
    cols = []
    for layer, pos, f in graph.features_F3.tolist():
        cols.append(run.x_in[layer][:, pos] @ tcs[layer].W_enc[f])
    last = run.logits[:, -1]
    for tok in graph.logit_tokens_K.tolist():
        cols.append(last[:, tok] - last.mean(-1))
    return torch.stack(cols, 1)


def intervened_edges(model, tcs: dict[int, SAE], graph) -> tuple[torch.Tensor, list]:
    """[rows, sources in node order] by intervention: target input at the prompt minus target
    input with the source removed, in the frozen plain model."""
    with torch.no_grad():
        base = plain_forward(model, IDS)
        names, mlp_delta, emb_delta = _sources(model, tcs, base)
        removed = plain_forward(model, IDS, frozen=base, mlp_delta=mlp_delta, embed_delta=emb_delta)
        ref = _target_inputs(base, graph, tcs)[0]
        return (ref[None] - _target_inputs(removed, graph, tcs)).T, names


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_plain_reference_matches_transformers(dtype: torch.dtype, tol: float) -> None:
    """(transformers computes RMSNorm in float32 even in a float64 model: hence 1e-6 there;
    the reference and the attribution keep float64.)"""
    model = tiny_model(dtype)
    with torch.no_grad():
        want = model(IDS[None]).logits
        got = plain_forward(model, IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_frozen_replacement_reproduces_logits(dtype: torch.dtype, tol: float) -> None:
    """(a) The replacement model (transcoder output + error at every layer, frozen patterns
    and scales) gives the original logits, and its MLP outputs are features + error."""
    model = tiny_model(dtype)
    tcs = dict(enumerate(transcoders(list(range(N_LAYERS)), dtype)))
    with torch.no_grad():
        want = model(IDS[None]).logits[0, -1]
    with frozen_forward(model) as tape:
        model.model(input_ids=IDS[None], use_cache=False)
        got = model.lm_head(tape.final)[0, -1]
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=tol * want.abs().max().item())
    base = plain_forward(model, IDS)
    for layer, sae in tcs.items():
        acts = sae.encode(base.x_in[layer][0])
        acts[0] = 0
        err = base.mlp_out[layer][0] - sae.decode(acts)
        rebuilt = sae.decode(acts) + err
        torch.testing.assert_close(rebuilt[1:], tape.mlp_out[layer][0, 1:].detach(),
                                   rtol=0, atol=10 * tol)


def _check_graph(model, tcs: list[SAE], graph, atol: float, logit_atol: float | None = None
                 ) -> None:
    """Every edge of ``graph`` against intervention: absolute tolerance ``atol`` on feature
    rows and ``logit_atol`` (default ``atol``) on logit rows."""
    by_layer = {int(s.hyperparams.hook_point_out.split(".")[1]): s for s in tcs}
    ref, names = intervened_edges(model, by_layer, graph)
    feats = [n for n in names if n[0] == "feature"]
    assert [list(f[1:4]) for f in feats] == graph.active_features_A3.tolist()
    torch.testing.assert_close(torch.tensor([f[4] for f in feats], dtype=torch.float64),
                               graph.activations_A.double(), rtol=1e-6, atol=1e-6)
    n_active = len(feats)
    keep = torch.cat([graph.selected_A, torch.arange(n_active, len(names))])
    want = ref[:, keep]
    assert graph.edges_RC.shape == want.shape
    diff = (graph.edges_RC.double() - want).abs()
    nf = graph.n_features
    feat_err, logit_err = diff[:nf].max().item(), diff[nf:].max().item()
    assert feat_err <= atol, f"feature rows: max edge error {feat_err:.3g} > {atol}"
    assert logit_err <= (logit_atol or atol), f"logit rows: max error {logit_err:.3g}"
    assert (want.abs() > 1e-3).sum() > want.numel() // 10  # the edges are not all ~0


@pytest.mark.parametrize("dtype,atol,logit_atol", [(torch.float64, 1e-10, 1e-10),
                                                   (torch.float32, 5e-4, 1e-5)])
def test_every_edge_equals_intervention(dtype: torch.dtype, atol: float, logit_atol: float) -> None:
    """(b) Every edge (features, errors, tokens -> features, logits) is the direct effect
    measured by removing the source in the independent frozen forward (run in float64).
    float32: circuit-tracer's own tolerances (5e-4 on features, 1e-5 on logits; measured
    3.8e-5 and 1.8e-6 with edges up to 92 and 8.9); float64: 1e-10 (measured 4e-14)."""
    model = tiny_model(dtype)
    tcs = transcoders(list(range(N_LAYERS)), dtype)
    graph = attribute(model, tcs, IDS, batch_size=64)
    assert graph.n_features == graph.active_features_A3.shape[0] > 50
    _check_graph(model.double(), [t.double() for t in tcs], graph, atol, logit_atol)


def test_layer_without_transcoder_is_one_error_node_per_position() -> None:
    model = tiny_model()
    tcs = transcoders([0, 2])
    graph = attribute(model, tcs, IDS, batch_size=32)
    assert set(graph.active_features_A3[:, 0].tolist()) == {0, 2}
    _check_graph(model, tcs, graph, 1e-10)


def test_selected_features_keep_exact_edges() -> None:
    """With max_feature_nodes below the active count, the chosen rows are still exact and the
    first ones chosen are the most influential (the logits' strongest direct inputs)."""
    model = tiny_model()
    tcs = transcoders(list(range(N_LAYERS)))
    full = attribute(model, tcs, IDS, batch_size=32)
    graph = attribute(model, tcs, IDS, max_feature_nodes=40, batch_size=16)
    assert graph.n_features == 40
    _check_graph(model, tcs, graph, 1e-10)
    # the feature with the largest direct effect on the top logit was selected
    top_logit_row = full.edges_RC[full.n_features, : full.n_features].abs()
    best = full.selected_A[int(top_logit_row.argmax())]
    assert best in graph.selected_A


@pytest.mark.parametrize("chunk", [1, 2500])
def test_partial_batches_and_position_chunks_keep_exact_edges(monkeypatch, chunk: int) -> None:
    """Rows in batches of 5 (the last one partial) with the decoder contraction cut into runs
    of one position (chunk 1) or a few (2500 values): every edge still equals intervention."""
    from llamascope_sdk.trace import rows

    monkeypatch.setattr(rows, "CHUNK_ELEMENTS", chunk)
    model = tiny_model()
    tcs = transcoders(list(range(N_LAYERS)))
    graph = attribute(model, tcs, IDS, batch_size=5)
    assert (graph.n_features + graph.n_logits) % 5 != 0
    _check_graph(model, tcs, graph, 1e-10)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_and_grad_flags_restored_after_an_error(monkeypatch) -> None:
    from llamascope_sdk.trace import rows

    model = tiny_model()
    model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    flags = [p.requires_grad for p in model.parameters()]
    before = _hook_count(model)
    attribute(model, transcoders([1]), IDS, batch_size=8)
    assert _hook_count(model) == before

    def boom(*_a, **_k):
        raise RuntimeError("boom")
    monkeypatch.setattr(rows, "backward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        attribute(model, transcoders([1]), IDS, batch_size=8)
    assert _hook_count(model) == before
    assert [p.requires_grad for p in model.parameters()] == flags


def test_widest_position_counts_the_most_features_at_one_layer_and_position() -> None:
    from collections import Counter

    from llamascope_sdk.trace.memory import widest_position

    model = tiny_model()
    graph = attribute(model, transcoders(list(range(N_LAYERS))), IDS, batch_size=64)
    a3 = graph.active_features_A3
    want = max(Counter((int(r[0]), int(r[1])) for r in a3).values())
    assert widest_position(a3) == want > 1
    assert widest_position(a3[:0]) == 0
