"""Activations of prompt sets at hook points: captured once per (model, hook point, prompt set)
and shared by every SAE read at that hook point, on disk, bounded and resumable.

One forward per batch of prompts records every hook point still missing for that prompt set
(the forward stops after the last one), so the 8x and 32x SAEs of one site, or an SAE and its
retrained copy, cost one model pass between them, and a second ``llamascope bench`` run with
another SAE at a cached site costs no model pass at all. Each prompt contributes the
activation [D] of one position: its last token (sae-probes) or a fixed number of tokens
before the end (absorption reads the word before a fixed suffix).

Prompts are tokenised with BOS first and the END kept when they are longer than ``max_len``
(sae-probes truncates on the left, at 1024 tokens), sorted by length and batched up to
``batch_tokens`` padded tokens per forward, a batch's rows at most 10% shorter than its widest
(so padding is at most 10% of a batch; padding is masked and never changes a row's numbers
beyond float rounding, tested against a plain forward of each prompt alone).

**Each distinct token sequence runs once.** The activation of a row depends only on its token
ids and the position read, so rows are keyed by a hash of (ids, position from the end): a row
repeated inside a set, or already captured in another set at this hook point (this run or an
earlier one, found through the keys stored beside every set's activations), is copied, not
recomputed. The sae-probes datasets repeat many prompts (the three code datasets share most
of theirs, the AG News, MNLI, cancer and time-zone families likewise, and 57,676 rows repeat
inside their own dataset): for SmolLM2 their 35.1M tokens are 18.4M distinct ones. A copied
row is bit-identical to the row it copies; that row was computed in another batch, which
differs from an unbatched forward only by float rounding (tested).

**Disk** (float32): ``<root>/<model key>/<hook point>/<set>.safetensors``, one [N, D] tensor.
The model key hashes the model's name, shape, dtype, tokenizer and ``max_len``, so a cache is
never read for another model. Size, before any forward (:func:`cache_bytes`)::

    bytes = 4 * D * (number of hook points) * sum over prompt sets of N_set

plus 16 bytes of key per prompt; e.g. all 113 sae-probes datasets (334,092 prompts) at one hook point: 0.77 GB for D = 576
(SmolLM2-135M), 5.5 GB for D = 4096 (Llama-3.1-8B). A run whose total exceeds
``max_bytes`` is refused in one line before the model runs. A file is written atomically when
its prompt set is complete, so a killed run continues from the first set it had not finished.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llamascope_sdk.base.atomic import atomic_save_safetensors
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.core.sites import Site, hidden_size
from llamascope_sdk.corpus import bos_ids, encode, pad_id
from llamascope_sdk.loading.capture import capture
from llamascope_sdk.loading.models import model_device

#: sae-probes' ``max_seq_len``.
MAX_LEN = 1024
BYTES_PER_VALUE = 4
#: A batch's rows are at most this fraction shorter than its widest row (padding bound).
MAX_PAD = 0.1
#: Bytes of the key that identifies a row's (ids, position) (blake2b digest).
KEY_BYTES = 16


def cache_bytes(n_rows: int, d_model: int, n_sites: int) -> int:
    """The documented bound: 4 bytes x D x hook points x prompts."""
    return BYTES_PER_VALUE * d_model * n_sites * n_rows


def model_key(model: nn.Module, tokenizer: Any, max_len: int) -> str:
    """A folder name that changes with anything that changes the activations."""
    cfg = getattr(model, "config", None)
    name = str(getattr(cfg, "_name_or_path", "") or type(model).__name__)
    dtype = next(model.parameters()).dtype
    ident = json.dumps([name, hidden_size(model), getattr(cfg, "num_hidden_layers", None),
                        getattr(cfg, "vocab_size", None), str(dtype),
                        getattr(tokenizer, "name_or_path", ""), bos_ids(tokenizer), max_len,
                        [float(p.detach().flatten()[:4096].float().sum()) for p in list(model.parameters())[:2]]])
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.split("/")[-1])[:40]
    return f"{slug or 'model'}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def row_key(ids: Sequence[int], from_end: int) -> bytes:
    """The identity of one row's activation: its token ids and the position read."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(int(from_end).to_bytes(4, "little"))
    h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return h.digest()


@dataclass
class Timing:
    """Where the capture time went (for the bench's forward-vs-probe share)."""

    forward_s: float = 0.0
    tokenize_s: float = 0.0
    tokens: int = 0  # tokens that went through the model (distinct rows only)
    padded_tokens: int = 0  # the same, padding included (batch width x rows)
    reused_rows: int = 0  # rows copied from an identical row (this set or another)
    reused_tokens: int = 0
    forwards: int = 0
    loaded_sets: int = 0
    computed_sets: int = 0
    per_set_s: dict[str, float] = field(default_factory=dict)


class ActivationCache:
    """Per-prompt activations at hook points of one model, on disk under ``root``."""

    def __init__(self, root: str | Path, model: nn.Module, tokenizer: Any, *,
                 max_len: int = MAX_LEN, batch_tokens: int = 8192) -> None:
        if max_len < 2 or batch_tokens < max_len:
            raise InputError(f"max_len must be >= 2 and batch_tokens >= max_len; got {max_len}, "
                             f"{batch_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.max_len, self.batch_tokens = max_len, batch_tokens
        self.folder = Path(root) / model_key(model, tokenizer, max_len)
        self.timing = Timing()
        # per hook point: row key -> (set name, row), over every set on disk
        self._index: dict[Site, dict[bytes, tuple[str, int]]] = {}

    def path(self, site: Site, name: str) -> Path:
        return self.folder / site.hook_point / f"{name}.safetensors"

    def has(self, site: Site, name: str) -> bool:
        return self.path(site, name).is_file()

    def get(self, name: str, prompts: Sequence[str], sites: Sequence[Site], *,
            from_end: int = 0) -> dict[Site, torch.Tensor]:
        """``{site: [N, D] float32}`` for ``prompts`` (set ``name``), from disk where present;
        the missing sites are captured in one pass (rows seen before are copied) and written."""
        out: dict[Site, torch.Tensor] = {}
        missing = [s for s in dict.fromkeys(sites) if not self._load(s, name, len(prompts), out)]
        if missing:
            t0 = time.perf_counter()
            stale = [s for s in missing if self.has(s, name)]  # another version on disk
            rows = self.ids(prompts)
            self.timing.tokenize_s += time.perf_counter() - t0
            keys = [row_key(r, from_end) for r in rows]
            acts = self._capture(name, rows, keys, missing, from_end)
            key_t = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8)
            for s, x in acts.items():
                self.path(s, name).parent.mkdir(parents=True, exist_ok=True)
                atomic_save_safetensors({"acts": x, "keys": key_t.view(len(keys), KEY_BYTES)},
                                        self.path(s, name),
                                        metadata={"n": str(len(prompts)), "from_end": str(from_end)})
                if s in stale:
                    self._index.pop(s, None)  # its old rows moved: read the keys again
                else:
                    self._register(s, name, keys)
                out[s] = x
            self.timing.per_set_s[name] = time.perf_counter() - t0
            self.timing.computed_sets += 1
        else:
            self.timing.loaded_sets += 1
        return out

    def _load(self, site: Site, name: str, n: int, out: dict[Site, torch.Tensor]) -> bool:
        if not self.has(site, name):
            return False
        from safetensors.torch import load_file

        x = load_file(str(self.path(site, name)))["acts"]
        if x.shape[0] != n:
            return False  # another version of the prompt set: captured again
        out[site] = x
        return True

    def ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """BOS + the last ``max_len - 1`` tokens of each prompt."""
        bos = bos_ids(self.tokenizer)
        keep = self.max_len - len(bos)
        return [bos + encode(self.tokenizer, p, bos=False)[-keep:] for p in prompts]

    def _register(self, site: Site, name: str, keys: Sequence[bytes]) -> None:
        index = self._site_index(site)
        for i, k in enumerate(keys):
            index.setdefault(k, (name, i))

    def _site_index(self, site: Site) -> dict[bytes, tuple[str, int]]:
        """The keys of every set already on disk at ``site`` (read once per cache object)."""
        if site not in self._index:
            from safetensors import safe_open

            index: dict[bytes, tuple[str, int]] = {}
            folder = self.folder / site.hook_point
            for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                with safe_open(str(f), framework="pt") as h:
                    if "keys" not in set(h.keys()):
                        continue  # written before keys were stored: not reused
                    raw = h.get_tensor("keys").numpy().tobytes()
                for i in range(len(raw) // KEY_BYTES):
                    index.setdefault(raw[i * KEY_BYTES:(i + 1) * KEY_BYTES], (f.stem, i))
            self._index[site] = index
        return self._index[site]

    def _capture(self, name: str, rows: list[list[int]], keys: list[bytes], sites: list[Site],
                 from_end: int) -> dict[Site, torch.Tensor]:
        """Activations [N, D] of ``rows`` at ``sites``: one forward per distinct row that no
        set on disk holds at every site; the other rows are copied."""
        if any(len(r) <= from_end for r in rows):
            raise InputError(f"a prompt has {min(len(r) for r in rows)} tokens, fewer than the "
                             f"position read ({from_end} before the end)")
        d = hidden_size(self.model)
        result = {s: torch.empty(len(rows), d, dtype=torch.float32) for s in sites}
        first: dict[bytes, int] = {}
        todo: list[int] = []  # rows to compute: the first of each key held nowhere else
        copies: dict[Site, list[tuple[int, str, int]]] = {s: [] for s in sites}
        for i, k in enumerate(keys):
            if k in first:
                continue
            first[k] = i
            found = {s: self._site_index(s).get(k) for s in sites}
            if all(v is not None and v[0] != name for v in found.values()):
                for s, v in found.items():
                    assert v is not None
                    copies[s].append((i, *v))
            else:
                todo.append(i)
        self._forward(rows, todo, sites, from_end, result)
        for s in sites:
            self._copy_from_sets(s, copies[s], result[s])
        for i, k in enumerate(keys):
            j = first[k]
            if j != i:
                for s in sites:
                    result[s][i] = result[s][j]
        done = set(todo)
        self.timing.reused_rows += len(rows) - len(done)
        self.timing.reused_tokens += sum(len(r) for i, r in enumerate(rows) if i not in done)
        return result

    def _copy_from_sets(self, site: Site, copies: list[tuple[int, str, int]],
                        out_ND: torch.Tensor) -> None:
        """Rows of this set that other sets on disk hold: read from their files."""
        from safetensors.torch import load_file

        by_set: dict[str, list[tuple[int, int]]] = {}
        for i, other, j in copies:
            by_set.setdefault(other, []).append((i, j))
        for other, pairs in by_set.items():
            src = load_file(str(self.path(site, other)))["acts"]
            dst, rows = zip(*pairs, strict=True)
            out_ND[list(dst)] = src[list(rows)]

    def _batches(self, rows: list[list[int]], todo: list[int]) -> Iterator[list[int]]:
        """Row indices by decreasing length, at most ``batch_tokens`` padded tokens a batch,
        and no row shorter than its batch's widest by more than :data:`MAX_PAD` of it (the
        padding of the short prompts cost 35% more forward before this bound)."""
        order = sorted(todo, key=lambda i: -len(rows[i]))
        start = 0
        while start < len(order):
            width = len(rows[order[start]])
            floor, cap = width - int(width * MAX_PAD), max(1, self.batch_tokens // width)
            end = start + 1
            while end < len(order) and end - start < cap and len(rows[order[end]]) >= floor:
                end += 1
            yield order[start:end]
            start = end

    def _forward(self, rows: list[list[int]], todo: list[int], sites: list[Site],
                 from_end: int, result: dict[Site, torch.Tensor]) -> None:
        dev, pad = model_device(self.model), pad_id(self.tokenizer)
        for chunk in self._batches(rows, todo):
            width = len(rows[chunk[0]])
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            lengths = torch.tensor([len(rows[i]) for i in chunk])
            for j, i in enumerate(chunk):
                ids[j, :len(rows[i])] = torch.tensor(rows[i])
            valid = torch.arange(width)[None, :] < lengths[:, None]
            t0 = time.perf_counter()
            acts, _ = capture(self.model, sites, ids, valid)
            self.timing.forward_s += time.perf_counter() - t0
            self.timing.tokens += int(lengths.sum())
            self.timing.padded_tokens += len(chunk) * width
            self.timing.forwards += 1
            pos = (lengths - 1 - from_end).to(dev)
            for s in sites:
                picked = acts[s][torch.arange(len(chunk), device=dev), pos]
                result[s][torch.tensor(chunk)] = picked.float().cpu()


__all__ = ["BYTES_PER_VALUE", "KEY_BYTES", "MAX_LEN", "MAX_PAD", "ActivationCache", "Timing",
           "cache_bytes", "model_key", "row_key"]
