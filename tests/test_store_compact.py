"""Store format 4's example encoding (llamascope_sdk/store/compact.py) on constructed windows:
exact round trip, one table entry per covered position, the fixes counted independently,
corrupt files refused in one line, and the bytes it saves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamascope_sdk.base.errors import CorruptCheckpointError
from llamascope_sdk.mining.slots import Examples
from llamascope_sdk.store.compact import encode_examples, narrow
from llamascope_sdk.store.files import read_examples

BOS = 1


def _corpus() -> dict[int, list[int]]:
    """Two documents' token ids by position (position 0 is BOS)."""
    g = torch.Generator().manual_seed(0)
    return {d: [BOS] + torch.randint(3, 900, (n - 1,), generator=g).tolist()
            for d, n in ((0, 200), (3, 90))}


def _examples(seq_len: int = 16, w: int = 7, center: int = 4, density: float = 0.2) -> Examples:
    """Windows as mining cuts them: documents split into sequences of ``seq_len`` whose BOS
    sits at the position of the previous sequence's last token (so the BOS shares its
    position with a document token of the sequence before), windows cut at the sequence's
    edges (-1), a fraction ``density`` of the activations non-zero besides the centre, three
    features (the middle one without examples)."""
    docs = _corpus()
    g = torch.Generator().manual_seed(1)
    rows = []  # (feature, doc, pos, tokens, acts)
    for d, ids in docs.items():
        for s0 in range(0, len(ids), seq_len - 1):  # sequence: BOS, then ids[s0 + 1 : s0 + seq_len]
            seq = [BOS] + ids[s0 + 1:s0 + seq_len] if s0 else ids[:seq_len]
            for t in range(1, len(seq), 2):
                tok = [seq[t + o] if 0 <= t + o < len(seq) else -1 for o in range(-center, w - center)]
                act = torch.rand(w, generator=g) * (torch.rand(w, generator=g) < density)
                act[center] = 1.0 + t
                act[torch.tensor(tok) < 0] = 0.0
                rows.append((0 if t % 4 == 1 else 2, d, s0 + t, tok, act))
    rows.sort(key=lambda r: r[0])
    counts = torch.bincount(torch.tensor([r[0] for r in rows]), minlength=3)
    return Examples(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]),
                    torch.stack([r[4][center] for r in rows]),
                    torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows]),
                    torch.tensor([r[3] for r in rows]), torch.stack([r[4] for r in rows]), center)


def _roundtrip(e: Examples, tmp_path: Path) -> tuple[dict[str, torch.Tensor], Examples]:
    path = tmp_path / "top.safetensors"
    save_file(encode_examples(e), str(path))
    return load_file(str(path)), read_examples(path, e.d_sae, e.center, 4)


def _same(a: Examples, b: Examples) -> bool:
    return all(torch.equal(getattr(a, k).long() if getattr(a, k).dtype != torch.float32
                           else getattr(a, k), getattr(b, k))
               for k in ("indptr", "values", "doc", "pos", "tokens", "acts"))


def test_windows_come_back_exactly_with_one_table_entry_per_position(tmp_path):
    e = _examples()
    t, back = _roundtrip(e, tmp_path)
    assert _same(e, back) and back.center == e.center
    # Independent count: every (doc, pos) a window covers, and the ids shown there.
    seen: dict[tuple[int, int], list[int]] = {}
    for r in range(len(e.doc)):
        for j in range(e.width):
            if int(e.tokens[r, j]) >= 0:
                seen.setdefault((int(e.doc[r]), int(e.pos[r]) - e.center + j), []).append(
                    int(e.tokens[r, j]))
    assert len(t["table_token"]) == len(seen)
    conflicts = {k: v for k, v in seen.items() if len(set(v)) > 1}
    assert conflicts, "the constructed windows include a BOS over a document token"
    minority = sum(len(v) - max(v.count(x) for x in set(v)) for v in conflicts.values())
    assert len(t["fix_token"]) == minority
    assert "values" not in t and "tokens" not in t and "acts" not in t  # derived, not stored
    assert len(t["act_value"]) == int((e.acts != 0).sum())


def test_values_that_differ_from_the_centre_are_kept(tmp_path):
    e = _examples()
    e.values = e.values.clone()
    e.values[3] += 0.5
    t, back = _roundtrip(e, tmp_path)
    assert "values" in t and _same(e, back)


def test_no_examples_at_all(tmp_path):
    e = Examples(torch.zeros(4, dtype=torch.long), torch.zeros(0), torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long),
                 torch.zeros(0, 5), 2)
    _, back = _roundtrip(e, tmp_path)
    assert _same(e, back) and back.width == 5


def test_narrow_picks_the_smallest_type_that_holds_the_values():
    for values, dtype in (([-1, 127], torch.int8), ([0, 128], torch.int16),
                          ([-40000, 3], torch.int32), ([2**31], torch.int64)):
        t = narrow(torch.tensor(values))
        assert t.dtype == dtype and t.tolist() == values


@pytest.mark.parametrize(("change", "why"), [
    (lambda t: t.update(table_doc=t["table_doc"][1:], table_pos=t["table_pos"][1:],
                        table_token=t["table_token"][1:]),
     "the token table lacks positions that the windows cover"),
    (lambda t: t.update(lo=t["hi"] + 1), "lo/hi are not ranges inside the 7-token windows"),
    (lambda t: t.update(act_col=t["act_col"][:-1]), "tensor 'act_col' has shape"),
    (lambda t: t["act_value"].__setitem__(0, float("nan")), "tensor 'act_value' holds nan"),
    (lambda t: t.update(width=torch.tensor([3])), "the window centre 4 does not fit"),
])
def test_a_corrupt_file_is_one_line_naming_it(tmp_path, change, why):
    path = tmp_path / "top.safetensors"
    t = encode_examples(_examples())
    change(t)
    save_file(t, str(path))
    with pytest.raises(CorruptCheckpointError) as exc:
        read_examples(path, 3, 4, 4)
    assert str(exc.value).startswith(f"{path}: ") and why in str(exc.value)
    assert "\n" not in str(exc.value)


def test_the_encoding_costs_a_fraction_of_format_3(tmp_path):
    """Format 3 wrote tokens int32 and activations float32 for every window entry; with 64-token
    windows, overlapping as the decile sample's do, and about 5% of the activations non-zero,
    format 4 is under a quarter of that."""
    e = _examples(seq_len=128, w=64, center=48, density=0.04)
    nz = float((e.acts != 0).float().mean())
    assert 0.02 < nz < 0.08
    path = tmp_path / "top.safetensors"
    save_file(encode_examples(e), str(path))
    v3 = tmp_path / "v3.safetensors"
    save_file({"indptr": e.indptr, "values": e.values, "doc": e.doc, "pos": e.pos,
               "tokens": e.tokens.int(), "acts": e.acts}, str(v3))
    assert path.stat().st_size < v3.stat().st_size / 4
