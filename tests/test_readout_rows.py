"""Readouts read for many rows at once (one encode per SAE and feature set per forward): each
row's values at each event equal the SAE's encoding of that row's own activations, computed
here from a plain forward of the whole sequence with a PyTorch hook; readouts named in any
order come back in the order named."""

from __future__ import annotations

import torch

from llamascope_sdk.steering.batch_generation import BatchGenerator, Row
from llamascope_sdk.steering.readout import Readout
from tests.helpers import tiny_sae

SPECIAL = (0, 1, 2)  # pad, bos, eos of tiny_llama


def _activations(model, ids: list[int], layer: int) -> torch.Tensor:
    """[T, D]: the output of layer ``layer`` for ``ids`` (one plain forward, no cache)."""
    got: list[torch.Tensor] = []

    def hook(_m, _a, out):
        got.append((out[0] if isinstance(out, tuple) else out)[0].detach().clone())

    h = model.model.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        h.remove()
    return got[0]


def test_rows_read_together_equal_each_rows_own_encoding(tiny_llama) -> None:
    sae0, sae1 = tiny_sae(layer=0, seed=1), tiny_sae(layer=1, seed=2)
    feats = [3, 17, 40, 41, 100, 200, 201, 255]
    prompts = [[1, 5, 6, 7, 8, 9], [1, 9], [1, 3, 3, 4], [1, 11, 12]]
    # rows 0, 1, 3 share a readout (read together); row 0 also names an earlier layer's
    # top-k after it (came back in the order named); row 2 names other features
    readouts = [[Readout(sae1, feats), Readout(sae0, top_k=4)], [Readout(sae1, feats)],
                [Readout(sae1, [0, 1])], [Readout(sae1, feats)]]
    gen = BatchGenerator(tiny_llama, special=SPECIAL, pad=0)
    handles = [gen.add(Row(p, max_new_tokens=5, stop_ids=(), readouts=r))
               for p, r in zip(prompts, readouts, strict=True)]
    events: dict[int, list] = {h: [] for h in handles}
    while gen.busy:
        for t in gen.step():
            events[t.row].append(t)
    for b, h in enumerate(handles):
        tokens = [t.token for t in events[h] if t.token is not None]
        seq = prompts[b] + tokens
        read_ids = [i for t in events[h] for i in t.read_ids]
        assert read_ids == seq  # the prompt, then each generated token, the last one included
        keep = torch.tensor([i not in SPECIAL for i in seq])
        for k, r in enumerate(readouts[b]):
            got_v = torch.cat([t.readout[k].values for t in events[h]])
            got_f = torch.cat([t.readout[k].features for t in events[h]])
            f_all = r.sae.encode(_activations(tiny_llama, seq, r.site.layer)) * keep[:, None]
            if r.idx is not None:
                assert torch.equal(got_f, r.idx.expand(len(seq), -1))
                torch.testing.assert_close(got_v, f_all[:, r.idx], rtol=1e-5, atol=1e-5)
            else:
                torch.testing.assert_close(got_v, f_all.gather(1, got_f), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got_v, f_all.topk(4, dim=-1).values, rtol=1e-5,
                                           atol=1e-5)
        assert (torch.cat([t.readout[0].values for t in events[h]]) > 0).any()
