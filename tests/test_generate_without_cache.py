"""``model.generate(..., use_cache=False)``: interventions hit exactly the positions they hit with
the KV cache. Without a cache every step is a fresh forward over the whole sequence; the
Attachment treats a cache-less forward that extends the current ids as the same sequence."""

from __future__ import annotations

import pytest
import torch

from llamascope_sdk import Steer, attach

from .helpers import tiny_sae

IDS = torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
P = IDS.shape[1]
NEW = 8
L = P + NEW  # generated length; the last token is never fed back
POSITIONS = {
    "prompt": list(range(1, P)),  # BOS (position 0) is special and left alone
    "generated": list(range(P, L - 1)),
    "all": list(range(1, L - 1)),
    "slice": list(range(3, 10)),
}


def _generate(model, sae, positions, *, use_cache: bool, strength: float = 6.0):
    """(tokens, per-forward (edited - clean) at layer 1's output, features, prompt_len)."""
    layer = model.model.layers[1]
    clean, edited = [], []
    p1 = layer.register_forward_hook(lambda m, a, o: clean.append(o.detach().clone()))
    iv = Steer(sae, [3, 7], strength, positions=positions)
    try:
        with attach(model, [sae], interventions=[iv]) as h:
            p2 = layer.register_forward_hook(lambda m, a, o: edited.append(o.detach().clone()))
            with torch.no_grad():
                out = model.generate(IDS, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0, use_cache=use_cache)
            p2.remove()
    finally:
        p1.remove()
    deltas = [e - c for c, e in zip(clean, edited, strict=True)]
    return out, deltas, h.features[sae.name], h.prompt_len


def _steered(delta_BTD: torch.Tensor) -> list[int]:
    return [int(t) for t in (delta_BTD[0].norm(dim=-1) > 1e-5).nonzero().flatten()]


@pytest.mark.parametrize("name", list(POSITIONS))
def test_uncached_generate_equals_cached_token_for_token(tiny_llama, name):
    positions = slice(3, 10) if name == "slice" else name
    sae = tiny_sae()
    tok_c, deltas_c, feats_c, plen_c = _generate(tiny_llama, sae, positions, use_cache=True)
    tok_u, deltas_u, feats_u, plen_u = _generate(tiny_llama, sae, positions, use_cache=False)
    assert tok_u.tolist() == tok_c.tolist()
    assert plen_u == plen_c == P
    # Cached: one forward per step, its new positions only; concatenated = the whole sequence.
    assert [d.shape[1] for d in deltas_c] == [P] + [1] * (NEW - 1)
    cached = torch.cat(deltas_c, dim=1)
    assert _steered(cached) == POSITIONS[name]
    # Uncached: forward k re-reads positions 0..P+k-1 and steers the same ones, same amount.
    assert [d.shape[1] for d in deltas_u] == [P + k for k in range(NEW)]
    for d in deltas_u:
        t = d.shape[1]
        assert _steered(d) == [p for p in POSITIONS[name] if p < t]
        torch.testing.assert_close(d, cached[:, :t], atol=1e-5, rtol=1e-5)
    # The captured features cover the same positions with the same values.
    assert feats_u.shape == feats_c.shape == (1, L - 1, sae.d_sae)
    torch.testing.assert_close(feats_u, feats_c, atol=1e-5, rtol=1e-5)


def test_steering_generated_positions_changes_the_uncached_output(tiny_llama):
    """The "generated" steer is really applied without a cache (it used to be dropped)."""
    sae = tiny_sae()
    plain = _generate(tiny_llama, sae, "generated", use_cache=False, strength=0.0)[0]
    steered = _generate(tiny_llama, sae, "generated", use_cache=False, strength=40.0)[0]
    assert plain[0, :P + 1].tolist() == steered[0, :P + 1].tolist()  # first new token unaffected
    assert plain.tolist() != steered.tolist()


def test_a_new_prompt_still_starts_a_new_sequence(tiny_llama):
    """A forward whose ids do not extend the current ones (or any cached generate) resets."""
    sae = tiny_sae()
    with attach(tiny_llama, [sae]) as h, torch.no_grad():
        tiny_llama(input_ids=IDS)
        tiny_llama(input_ids=torch.tensor([[1, 9, 9, 9]]))
        assert h.prompt_len == 4 and h.features[sae.name].shape[1] == 4
        tiny_llama(input_ids=torch.tensor([[1, 9, 9, 9, 4, 4]]))  # extends it: same sequence
        assert h.prompt_len == 4 and h.features[sae.name].shape[1] == 6
        h.reset()  # by hand: a new sequence
        tiny_llama(input_ids=torch.tensor([[1, 9, 9, 9, 4, 4, 5]]))
        assert h.prompt_len == 7
