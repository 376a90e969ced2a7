"""Attribution on the real SmolLM2-135M with the demo transcoder set (issue 25 item 2 c, d).

(c) 200 sampled edges of a demo graph, each checked by intervention in the frozen replacement
model. The reference below is written here from the model's weights, in float64: a forward
that records the prompt's norm denominators (rms of ln1, ln2 and the final norm) and attention
patterns, then, for each source, adds the source's vector (a feature's decoder row times its
activation, an error vector, a token embedding) to the residual stream where the source writes
it and carries that perturbation through the frozen model (patterns and denominators fixed,
every MLP output fixed, so nothing flows through another MLP); a target's input change is its
encoder row (features) or its demeaned unembedding row through the final norm (logits) applied
to the perturbation. The frozen model is affine in the residual stream, so carrying the
perturbation alone equals the difference of two frozen forwards, without their cancellation.

(d) ablating a top feature (its decoder contribution removed at its position) in the real,
unfrozen model moves the top logit the way the graph's direct edge says.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from llamascope_sdk.core.hooks import hooked
from llamascope_sdk.core.sites import Site
from llamascope_sdk.loading.sae import SAE
from llamascope_sdk.trace import attribute

pytestmark = [pytest.mark.smollm, pytest.mark.slow]

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def demo_set():
    from llamascope_sdk.trace.demo import demo_transcoders

    return demo_transcoders()


@dataclass
class FrozenRef:
    """What the float64 reference forward recorded for one prompt."""

    rms1: list[torch.Tensor]  # per layer [T, 1]: 1 / rms of the attention input
    rms2: list[torch.Tensor]  # per layer [T, 1]: 1 / rms of the MLP input
    rmsf: torch.Tensor  # [T, 1]
    patterns: list[torch.Tensor]  # per layer [H, T, T]
    x_in: list[torch.Tensor]  # per layer [T, D], normalised without gain
    mlp_out: list[torch.Tensor]  # per layer [T, D]
    logits: torch.Tensor  # [T, V]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _rope(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split convention) of [H, T, d] at positions 0..T-1."""
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * _f64(inv_freq)[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _values(block, n_TD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """V of every query head ([H, T, d]), grouped KV heads repeated."""
    a = block.self_attn
    v = (n_TD @ _f64(a.v_proj.weight).T).view(n_TD.shape[0], -1, a.head_dim).transpose(0, 1)
    return v.repeat_interleave(n_heads // v.shape[0], 0)


def reference_forward(model, ids: torch.Tensor) -> FrozenRef:
    m, cfg = model.model, model.config
    eps, H = cfg.rms_norm_eps, cfg.num_attention_heads
    inv = lambda x: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
    h = _f64(m.embed_tokens.weight[ids])
    T = h.shape[0]
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    ref = FrozenRef([], [], torch.empty(0), [], [], [], torch.empty(0))
    for block in m.layers:
        a = block.self_attn
        r1 = inv(h)
        n = h * r1 * _f64(block.input_layernorm.weight)
        q = (n @ _f64(a.q_proj.weight).T).view(T, H, a.head_dim).transpose(0, 1)
        k = (n @ _f64(a.k_proj.weight).T).view(T, -1, a.head_dim).transpose(0, 1)
        q, k = _rope(q, m.rotary_emb.inv_freq), _rope(k, m.rotary_emb.inv_freq)
        k = k.repeat_interleave(H // k.shape[0], 0)
        p = torch.softmax((q @ k.transpose(-1, -2) / a.head_dim ** 0.5).masked_fill(causal, -torch.inf), -1)
        att = (p @ _values(block, n, H)).transpose(0, 1).reshape(T, -1) @ _f64(a.o_proj.weight).T
        h = h + att
        r2 = inv(h)
        z = h * r2 * _f64(block.post_attention_layernorm.weight)
        mlp = block.mlp
        y = (torch.nn.functional.silu(z @ _f64(mlp.gate_proj.weight).T) * (z @ _f64(mlp.up_proj.weight).T)
             ) @ _f64(mlp.down_proj.weight).T
        ref.rms1.append(r1), ref.rms2.append(r2), ref.patterns.append(p)
        ref.x_in.append(h * r2), ref.mlp_out.append(y)
        h = h + y
    ref.rmsf = inv(h)
    ref.logits = (h * ref.rmsf * _f64(m.norm.weight)) @ _f64(model.lm_head.weight).T
    return ref


def propagate(model, ref: FrozenRef, start: int, delta_TD: torch.Tensor
              ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Carry a residual perturbation entering before layer ``start`` through the frozen
    model: (change of each later layer's normalised MLP input [T, D], change of the final
    normed residual at the last position [D], gain included)."""
    H = model.config.num_attention_heads
    d, x_change = delta_TD, {}
    for layer in range(start, len(model.model.layers)):
        block = model.model.layers[layer]
        n = d * ref.rms1[layer] * _f64(block.input_layernorm.weight)
        att = (ref.patterns[layer] @ _values(block, n, H)).transpose(0, 1).reshape(d.shape[0], -1)
        d = d + att @ _f64(block.self_attn.o_proj.weight).T
        x_change[layer] = d * ref.rms2[layer]
    return x_change, (d * ref.rmsf * _f64(model.model.norm.weight))[-1]


def _decoded(sae: SAE, feature: int, activation: float) -> torch.Tensor:
    """activation x the feature's decoder direction, as decode() writes it (float64)."""
    f = torch.zeros(2, sae.d_sae, dtype=sae.dtype)
    f[0, feature] = activation
    y = sae.decode(f)
    return _f64(y[0] - y[1])


def source_vector(model, graph, tcs: list[SAE], ref: FrozenRef, col: int
                  ) -> tuple[int, int, torch.Tensor]:
    """(layer the perturbation enters before, position, vector) of edge column ``col``."""
    if col < graph.n_features:
        layer, pos, feat = (int(v) for v in graph.features_F3[col])
        return layer + 1, pos, _decoded(tcs[layer], feat, float(graph.feature_activations_F[col]))
    if col < graph.token_offset:  # error: the MLP output minus the decoded active features
        layer, pos = divmod(col - graph.n_features, graph.n_pos)
        f = torch.zeros(1, tcs[layer].d_sae, dtype=tcs[layer].dtype)
        at = (graph.active_features_A3[:, 0] == layer) & (graph.active_features_A3[:, 1] == pos)
        f[0, graph.active_features_A3[at, 2]] = graph.activations_A[at].to(f.dtype)
        err = ref.mlp_out[layer][pos] - _f64(tcs[layer].decode(f)[0])
        return layer + 1, pos, err if pos > 0 else torch.zeros_like(err)  # BOS: no node
    pos = col - graph.token_offset
    return 0, pos, _f64(model.model.embed_tokens.weight[int(graph.input_tokens_T[pos])])


def target_change(model, graph, tcs: list[SAE], x_change, final_change, row: int) -> float:
    if row < graph.n_features:
        layer, pos, feat = (int(v) for v in graph.features_F3[row])
        if layer not in x_change:
            return 0.0
        return float(_f64(tcs[layer].W_enc[feat]) @ x_change[layer][pos])
    k = row - graph.n_features
    w = _f64(model.lm_head.weight)
    u = w[int(graph.logit_tokens_K[k])] - w.mean(0)
    return float(u @ final_change)


def sample_edges(graph, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (row, column) pairs: 3/4 among the non-zero edges, 1/4 anywhere."""
    g = torch.Generator().manual_seed(seed)
    nz = graph.edges_RC.nonzero()
    pick = nz[torch.randperm(nz.shape[0], generator=g)[: 3 * n // 4]]
    rest = n - pick.shape[0]
    anywhere = torch.stack([torch.randint(0, graph.edges_RC.shape[0], (rest,), generator=g),
                            torch.randint(0, graph.edges_RC.shape[1], (rest,), generator=g)], 1)
    return [(int(r), int(c)) for r, c in torch.cat([pick, anywhere])]


@pytest.fixture(scope="module")
def demo_graph(smollm2, demo_set):
    model, tok = smollm2
    return attribute(model, demo_set, PROMPT, tokenizer=tok, max_feature_nodes=192, batch_size=64)


def test_reference_forward_matches_transformers(smollm2):
    model, tok = smollm2
    from llamascope_sdk.loading.models import tokenize

    ids = tokenize(tok, PROMPT)[0]
    ref = reference_forward(model, ids)
    with torch.no_grad():
        got = model(input_ids=ids[None]).logits[0].double()
    assert (ref.logits - got).abs().max() < 2e-3 * got.abs().max()


def test_200_sampled_edges_equal_interventions(smollm2, demo_set, demo_graph):
    model, _ = smollm2
    g = demo_graph
    ref = reference_forward(model, g.input_tokens_T)
    edges = sample_edges(g, 200)
    by_col: dict[int, list[int]] = {}
    for r, c in edges:
        by_col.setdefault(c, []).append(r)
    got, want = [], []
    for col, rows in by_col.items():
        start, pos, vec = source_vector(model, g, demo_set, ref, col)
        delta = torch.zeros_like(ref.x_in[0])
        delta[pos] = vec
        x_change, final = propagate(model, ref, start, delta)
        for r in rows:
            want.append(target_change(model, g, demo_set, x_change, final, r))
            got.append(float(g.edges_RC[r, col]))
    got_t, want_t = torch.tensor(got), torch.tensor(want)
    scale = g.edges_RC.abs().max()
    assert len(got) == 200 and (want_t != 0).sum() >= 100
    err = (got_t - want_t).abs()
    assert err.max() <= 1e-4 * scale + 1e-3 * want_t.abs().max(), (err.max(), scale)
    assert torch.allclose(got_t, want_t, rtol=1e-3, atol=1e-4 * float(scale))


def ablated_logit_change(model, ids: torch.Tensor, layer: int, pos: int, vec: torch.Tensor,
                         token: int) -> float:
    """Change of the demeaned logit of ``token`` at the last position when ``vec`` is taken
    out of layer ``layer``'s MLP output at ``pos`` in the real model (every later MLP live)."""
    def remove(y_BTD: torch.Tensor) -> torch.Tensor:
        y = y_BTD.clone()
        y[:, pos] -= vec.to(y.dtype)
        return y

    with torch.no_grad():
        base = model(input_ids=ids[None]).logits[0, -1].double()
        with hooked(model, {Site(layer, "mlp_out"): remove}):
            new = model(input_ids=ids[None]).logits[0, -1].double()
    return float((new[token] - new.mean()) - (base[token] - base.mean()))


def test_ablating_top_features_moves_top_logit_as_predicted(smollm2, demo_set, demo_graph):
    model, _ = smollm2
    g = demo_graph
    top_row = g.n_features  # the first logit row: the most probable token
    direct = g.edges_RC[top_row, : g.n_features]
    order = direct.abs().argsort(descending=True)[:5].tolist()
    pred, actual = [], []
    for col in order:
        layer, pos, feat = (int(v) for v in g.features_F3[col])
        vec = _decoded(demo_set[layer], feat, float(g.feature_activations_F[col]))
        actual.append(ablated_logit_change(model, g.input_tokens_T, layer, pos, vec,
                                           int(g.logit_tokens_K[0])))
        pred.append(-float(direct[col]))
    assert abs(pred[0]) > 0
    assert pred[0] * actual[0] > 0, (pred, actual)
    assert sum(p * a > 0 for p, a in zip(pred, actual, strict=True)) >= 4, (pred, actual)
