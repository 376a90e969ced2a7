"""Documents, tokens, activations from one early-stopped pass, the buffer and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamascope_sdk.base.errors import DataUnavailableError
from llamascope_sdk.core.sites import module_for, parse_hook_point, rms_normalized
from llamascope_sdk.corpus import split_text
from llamascope_sdk.training.activations import ActivationGenerator
from llamascope_sdk.training.buffer import ShuffleBuffer
from llamascope_sdk.training.cache import CacheSource, write_cache
from llamascope_sdk.training.data import TokenSource, local_documents
from llamascope_sdk.training.sources import live_source

from .tiny import tiny_config

SITES = ["blocks.0.hook_attn_out", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out",
         "blocks.1.hook_resid_post"]


def test_split_text_on_headings_and_blank_lines() -> None:
    wiki = " = A = \n text a \n = = Sub = = \n more a \n = B = \n text b \n"
    assert [d.split("\n")[0].strip() for d in split_text(wiki)] == ["= A =", "= B ="]
    paras = "\n\n".join(["x" * 10] * 9)
    assert len(split_text(paras, pack_chars=30)) == 3


def test_local_formats_and_holdout(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(10)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"p{i}" for i in range(4)]}), tmp_path / "b.parquet")
    ds = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.parquet'}"
    train = local_documents(ds, holdout_fraction=0.25)
    held = local_documents(ds, holdout_fraction=0.25, heldout=True)
    assert train[:2] == ["doc 0", "doc 1"] and held == ["doc 8", "doc 9", "p3"]
    with pytest.raises(DataUnavailableError):
        local_documents(str(tmp_path / "missing.txt"))


def test_hub_dataset_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch, char_tokenizer) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    src = TokenSource(char_tokenizer, "cerebras/SlimPajama-627B")
    with pytest.raises(DataUnavailableError, match="SlimPajama.*local"):
        next(src.batches(2))


def test_tokens_bos_truncation_split_and_ranks(char_tokenizer) -> None:
    tok = char_tokenizer
    src = TokenSource(tok, "cerebras/x", context_size=5)
    assert src.encode("abcdefgh") == [(0, [1, *tok("abcd")["input_ids"]])]
    src.split_long = True
    assert [o for o, _ in src.encode("abcdefgh")] == [0, 4]
    src._local = [f"d{i}" for i in range(6)]
    src.world, src.rank, src.loop = 2, 1, False
    docs = [d for ds, _ in src.batches(2) for d, _ in ds]
    assert docs == [1, 3, 5] and src.position == 6


def test_one_pass_many_sites_early_stop_and_special_tokens(tiny_llama) -> None:
    model = tiny_llama
    tokens = torch.tensor([[1, 5, 6, 7, 2, 0], [1, 9, 9, 9, 9, 9]])
    lengths = torch.tensor([5, 6])
    ran = []
    h = model.model.layers[2].register_forward_hook(lambda *a: ran.append(1))
    out = ActivationGenerator(model, SITES, {0, 1, 2})(tokens, lengths)
    h.remove()
    assert not ran  # layer 2 never ran: stopped after blocks.1
    assert out["tokens"].tolist() == [5, 6, 7, 9, 9, 9, 9, 9]  # BOS, EOS, pad dropped
    ref: dict[str, torch.Tensor] = {}
    hooks = []
    for name in SITES:
        site = parse_hook_point(name)
        mod = module_for(model, site)
        if site.reads_input:
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: ref.__setitem__(n, rms_normalized(m, a[0]))))
        else:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, n=name: ref.__setitem__(n, o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        model(input_ids=tokens, attention_mask=(torch.arange(6) < lengths[:, None]).long())
    for hk in hooks:
        hk.remove()
    keep = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for name in SITES:
        torch.testing.assert_close(out[name], ref[name][keep])


def test_buffer_refills_at_half_and_shuffles() -> None:
    class Src:
        def __init__(self) -> None:
            self.pulled = 0

        def __iter__(self):
            for i in range(100):
                self.pulled += 1
                yield {"a": torch.arange(i * 10, i * 10 + 10)[:, None].float()}

        def state_dict(self):
            return {}

    src = Src()
    buf = ShuffleBuffer(src, ["a"], capacity=100, seed=0)
    b1 = buf.next_batch(30)["a"]
    assert src.pulled == 10 and b1.flatten().tolist() != list(range(30))
    buf.next_batch(30)
    assert src.pulled == 10  # 40 left: still above half
    buf.next_batch(30)
    assert src.pulled == 16  # fell below 50 -> refilled to 100


def test_cache_round_trip_and_resume(tmp_path: Path, tiny_llama, char_tokenizer) -> None:
    cfg = tiny_config(tmp_path)
    src = live_source(cfg, [cfg.hook_point_in], tiny_llama, char_tokenizer, loop=False)
    m = write_cache(src, tmp_path / "cache", shard_tokens=500, progress=False)
    assert m["complete"] and len(m["shards"]) > 2
    cs = CacheSource(tmp_path / "cache", epochs=2, seed=0)
    total = sum(c["tokens"].numel() for c in cs)
    assert total == 2 * m["tokens"]
    cs2 = CacheSource(tmp_path / "cache", epochs=1, seed=0)
    it = iter(cs2)
    next(it)
    state = cs2.state_dict()
    rest = [c["tokens"] for c in it]
    cs3 = CacheSource(tmp_path / "cache", epochs=1, seed=0)
    cs3.load_state_dict(state)
    assert all(torch.equal(a, b["tokens"]) for a, b in zip(rest, cs3, strict=True))


def test_local_corpus_is_streamed_and_loops_from_any_position(tmp_path: Path, char_tokenizer) -> None:
    """The local corpus is not held in memory: each pass reads the file again, and document i
    is the (i mod n)-th of the training part, from any resume position."""
    from itertools import islice

    from llamascope_sdk.corpus import LocalDocuments

    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(10)))
    docs = local_documents(str(path), holdout_fraction=0.3)
    assert docs == [f"doc {i}" for i in range(7)]
    stream = LocalDocuments(str(path), holdout_fraction=0.3)
    assert len(stream) == 7 and list(stream) == docs == list(stream)
    assert list(LocalDocuments(str(path), holdout_fraction=0.3, heldout=True)) == ["doc 7", "doc 8", "doc 9"]
    src = TokenSource(char_tokenizer, str(path), holdout_fraction=0.3)
    assert isinstance(src._local, LocalDocuments)
    for start in (0, 5, 7, 16):
        got = list(islice(src._documents(start), 12))
        assert got == [(i, docs[i % 7]) for i in range(start, start + 12)]
    src.loop = False
    assert [i for i, _ in src._documents(5)] == [5, 6]
