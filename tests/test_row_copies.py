"""Row copies: inputs of 1-3 rows use a column-major copy of each linear weight, nothing else changes.

Checked against independent products: inputs of one to three rows equal ``x @ W.T.contiguous()``
bit for bit (so the copy is really what runs), four rows equal ``F.linear`` bit for bit (the
weight itself), and a whole model's greedy tokens, steered and unsteered, and its log-probabilities
match the same model without copies (float rounding only).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from llamascope_sdk import Steer
from llamascope_sdk.cli import app
from llamascope_sdk.loading.row_copies import (
    CHUNK,
    CHUNK_MAX_ROWS,
    MAX_ROWS,
    add_row_copies,
    has_row_copies,
    remove_row_copies,
    row_copy_bytes,
)
from llamascope_sdk.steering.batch_generation import BatchGenerator, Row
from tests.helpers import tiny_sae

SPECIAL = [0, 1, 2]


def _tiny(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_few_rows_use_the_copy_and_more_rows_the_weight() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(48, 80, bias=True)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    model = nn.Sequential(lin)
    assert add_row_copies(model) == 48 * 80 * 4
    one, three, four = torch.randn(1, 1, 48), torch.randn(3, 1, 48), torch.randn(4, 48)
    assert MAX_ROWS == 3
    with torch.no_grad():
        assert torch.equal(lin(one), one @ w.t().contiguous() + b)
        assert torch.equal(lin(three), three @ w.t().contiguous() + b)
        assert torch.equal(lin(four), F.linear(four, w, b))
        row = torch.randn(5, 48)[2:3]  # one row, a view into a bigger tensor
        assert torch.equal(lin(row), row @ w.t().contiguous() + b)
        assert torch.allclose(lin(one), F.linear(one, w, b), atol=1e-5, rtol=0)


def test_a_large_matrix_is_sliced_for_4_to_16_rows_bit_for_bit() -> None:
    torch.manual_seed(5)
    lin = nn.Linear(40, 2 * CHUNK + 300, bias=True)  # a last slice shorter than CHUNK
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    add_row_copies(nn.Sequential(lin))
    seen = []
    orig = F.linear
    with torch.no_grad():
        for rows in (4, 9, CHUNK_MAX_ROWS, CHUNK_MAX_ROWS + 1):
            x = torch.randn(rows, 1, 40)
            F.linear = lambda *a: seen.append(a[1].shape[0]) or orig(*a)  # count the slices
            try:
                got = lin(x)
            finally:
                F.linear = orig
            assert torch.equal(got, F.linear(x, w, b)), rows
        assert seen == [CHUNK, CHUNK, 300] * 3 + [2 * CHUNK + 300]


def test_a_weight_changed_in_place_is_used_not_the_stale_copy() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(16, 8, bias=False)
    add_row_copies(nn.Sequential(lin))
    with torch.no_grad():
        lin.weight.mul_(3.0)
        x = torch.randn(1, 16)
        assert torch.equal(lin(x), F.linear(x, lin.weight))


def test_tied_weights_are_copied_once_and_removal_restores_the_model() -> None:
    model = _tiny()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    distinct = {id(m.weight): m.weight.numel() * 4 for m in linears}
    assert row_copy_bytes(model) == sum(distinct.values())
    assert add_row_copies(model) == sum(distinct.values())
    assert has_row_copies(model)
    assert model.lm_head.row_copy.data_ptr() != model.lm_head.weight.data_ptr()
    assert set(model.state_dict()) == set(before)  # the copies are never saved
    remove_row_copies(model)
    assert not has_row_copies(model)
    assert all(type(m) is nn.Linear for m in linears)
    assert not any(hasattr(m, "row_copy") for m in linears)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_only_cpu_models_get_copies() -> None:
    model = _tiny().to("meta")
    with pytest.raises(ValueError, match="row copies are for models on the CPU; this one is on meta"):
        add_row_copies(model)
    assert not has_row_copies(model)


def _generate(model, rows):
    gen = BatchGenerator(model, special=SPECIAL, pad=0)
    handles = [gen.add(Row(p, e, max_new_tokens=n, stop_ids=[], logprobs=2)) for p, e, n in rows]
    out: dict[int, list] = {h: [] for h in handles}
    with torch.inference_mode():
        while gen.busy:
            for t in gen.step():
                out[t.row].append((t.token, t.logprob))
    return [out[h] for h in handles]


@pytest.mark.parametrize("together", [False, True])
def test_generation_with_copies_matches_the_model_without(together: bool) -> None:
    """Greedy tokens equal and log-probabilities within float rounding, one row at a time (the
    copies run at every step) and five rows together (the weights run until rows finish and
    at most three are left, then the copies)."""
    model = _tiny(3)
    sae = tiny_sae(layer=1, seed=4)
    rows = [([1, 5, 9, 13], [Steer(sae, [3, 7], 4.0)], 12), ([1, 7, 8], [], 12),
            ([1, 60, 61], [], 6), ([1, 20, 21, 22, 23, 24], [Steer(sae, [1], -3.0)], 3),
            ([1, 30], [], 9)]
    batches = [rows] if together else [[r] for r in rows]
    plain = [t for b in batches for t in _generate(model, b)]
    add_row_copies(model)
    copied = [t for b in batches for t in _generate(model, b)]
    remove_row_copies(model)
    for a, b in zip(plain, copied, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [lp for _, lp in b] == pytest.approx([lp for _, lp in a], abs=1e-5, rel=0)


def test_cli_refuses_an_unknown_mode_before_loading(monkeypatch) -> None:
    import llamascope_sdk.loading.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    r = CliRunner().invoke(app, ["serve", "--model", "smollm2-135m", "--row-copies", "maybe"])
    assert r.exit_code == 2
    assert "'maybe' is not one of auto, on, off" in " ".join(r.output.split())


def test_cli_refuses_copies_for_a_gpu_before_loading(monkeypatch) -> None:
    import llamascope_sdk.loading.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    r = CliRunner().invoke(app, ["serve", "--model", "smollm2-135m", "--row-copies", "on",
                                 "--device", "cuda"])
    assert r.exit_code == 2
    assert "row copies are for a model on the CPU, not cuda" in " ".join(r.output.split())


@pytest.mark.parametrize(("mode", "copied"), [("auto", True), ("on", True), ("off", False)])
def test_cli_modes(mode: str, copied: bool, monkeypatch, char_tokenizer) -> None:
    import llamascope_sdk.loading.models as models
    import llamascope_sdk.serve as serve

    model, seen = _tiny(), {}
    monkeypatch.setattr(models, "load_model", lambda *a, **k: (model, char_tokenizer))
    monkeypatch.setattr(serve, "create_app", lambda m, *_a: seen.update(copied=has_row_copies(m)))
    monkeypatch.setattr(serve, "run", lambda *a: None)
    r = CliRunner().invoke(app, ["serve", "--model", "tiny", "--row-copies", mode])
    assert r.exit_code == 0, r.output
    assert seen["copied"] is copied
    assert ("row copies:" in r.output) is copied


def test_real_model_greedy_tokens_and_logprobs_unchanged(smollm2) -> None:
    """SmolLM2-135M, fp32: greedy continuations of four prompts, one at a time (the copies
    run at every decode step), equal without and with copies; the chosen tokens'
    log-probabilities agree to float rounding (without copies, decoding and a full forward of
    the same tokens already differ by up to 1.8e-5 on this model)."""
    from llamascope_sdk.steering.generation import prompt_ids

    model, tok = smollm2
    prompts = ["The capital of France is", "Once upon a time", "def add(a, b):", "Dear friend,"]
    rows = [(prompt_ids(tok, p)[0].tolist(), [], 24) for p in prompts]
    gen_rows = [[r] for r in rows]

    def run() -> list:
        out = []
        for b in gen_rows:
            gen = BatchGenerator(model, tok)
            h = gen.add(Row(*b[0][:2], max_new_tokens=b[0][2], stop_ids=[], logprobs=1))
            got = []
            with torch.inference_mode():
                while gen.busy:
                    got += [(t.token, t.logprob) for t in gen.step() if t.row == h]
            out.append(got)
        return out

    plain = run()
    add_row_copies(model)
    try:
        copied = run()
    finally:
        remove_row_copies(model)
    for a, b in zip(plain, copied, strict=True):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert [lp for _, lp in b] == pytest.approx([lp for _, lp in a], abs=5e-5, rel=0)
