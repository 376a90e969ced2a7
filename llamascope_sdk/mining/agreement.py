"""Every rank of a distributed mining run runs the same job, or none runs at all.

Each rank of ``torchrun`` starts ``mine`` with its own command line: another ``--dataset``,
``--tokens`` or SAE on one rank would otherwise be merged into one store that mixes two jobs.
Two checks, both collective (every rank takes part and every rank reaches the same verdict, so
all stop together with the same one-line :class:`~llamascope_sdk.base.errors.RankMismatchError`):

* before the first batch (:func:`check_same_job`): the job's identity (:func:`job_identity`:
  every argument of ``mine``, each SAE's weights fingerprint and dtype, and the corpus: for
  local files their sizes and a sha256 of their first and last MiB; for a Hugging Face dataset
  its name) is gathered from every rank and compared with rank 0's;
* after the last batch, before the merge (:func:`check_same_tokens`): a sha256 of every token
  id each rank read (every rank reads every batch, whichever rank runs the model on it), so two
  corpora that agree in size and ends but not in the middle are still told apart.

The identities travel as JSON bytes in uint8 tensors (no pickle), on ``device`` (nccl needs
CUDA tensors).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from llamascope_sdk.base.dist import Dist
from llamascope_sdk.base.errors import RankMismatchError
from llamascope_sdk.base.fingerprint import fingerprint
from llamascope_sdk.corpus import local_paths

#: Bytes read at each end of a local corpus file for its identity.
_ENDS = 2**20
#: A key of the identity that is shown in messages, never compared (the corpus files' names:
#: the same file may have another path or name on another node).
_SHOWN = "corpus_names"


def file_identity(path: Path) -> dict[str, Any]:
    """Size and a sha256 of the first and last MiB of ``path``: its content, not its name or
    time stamp (the same file copied to every node of a cluster has the same identity)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as fh:
        h.update(fh.read(_ENDS))
        if size > _ENDS:
            fh.seek(max(_ENDS, size - _ENDS))
            h.update(fh.read(_ENDS))
    return {"bytes": size, "sha256_ends": h.hexdigest()[:32]}


def corpus_identity(corpus: Any) -> Any:
    """What names the corpus on every rank: its local files' identities, a dataset name, or
    ``"strings"`` for an iterable of texts (told apart by :func:`check_same_tokens` alone)."""
    if not isinstance(corpus, str | os.PathLike):
        return "strings"
    paths = local_paths(corpus)
    if paths is None:
        return {"dataset": str(corpus)}
    return [file_identity(p) if p.is_file() else {"missing": True} for p in paths]


def _names(corpus: Any) -> str:
    if not isinstance(corpus, str | os.PathLike):
        return "a list of texts"
    return ", ".join(p.name for p in local_paths(corpus) or []) or str(corpus)


def job_identity(saes: Mapping[str, Any], corpus: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """The identity every rank must share: ``args`` (JSON-ready), the SAEs' fingerprints and
    dtypes, and the corpus."""
    return {"args": {k: args[k] for k in sorted(args)},
            "saes": {name: {"dtype": str(s.dtype).removeprefix("torch."), **fingerprint(s)}
                     for name, s in saes.items()},
            "corpus": corpus_identity(corpus), _SHOWN: _names(corpus)}


def gather_json(value: Any, dist: Dist, device: torch.device | str = "cpu") -> list[Any]:
    """``value`` (JSON-ready) of every rank, in rank order; every rank gets the same list."""
    if dist.world == 1:
        return [value]
    import torch.distributed as tdist  # only for a multi-process run

    data = torch.tensor(list(json.dumps(value, sort_keys=True).encode()), dtype=torch.uint8,
                        device=device)
    n = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.world)]
    tdist.all_gather(sizes, n)
    width = int(max(int(s) for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in range(dist.world)]
    tdist.all_gather(parts, padded)
    return [json.loads(bytes(p[:int(s)].cpu().tolist()).decode())
            for p, s in zip(parts, sizes, strict=True)]


def first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """The first place (a dotted path) where two JSON values differ, with both values there;
    None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{where}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else (where or "value", a, b)


def _describe(path: str, mine: Any, theirs: Any, ours: Any, other: Any) -> str:
    """One phrase for a difference at ``path`` (``ours``/``other``: the whole identities)."""
    if path.startswith("saes.") and path.count(".") >= 2:
        name, field = path.split(".", 2)[1:]
        return f"SAE {name!r} differs ({field}: {_short(theirs)} there, {_short(mine)} on rank 0)"
    if path.startswith("corpus"):
        shown = [v.get(_SHOWN) if isinstance(v, dict) else None for v in (other, ours)]
        return (f"the corpus differs ({shown[0]} there, {shown[1]} on rank 0; {path} "
                "differs)")
    return f"{path} is {_short(theirs)} there, {_short(mine)} on rank 0"


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def check_agree(values: list[Any], what: str) -> None:
    """Raise :class:`RankMismatchError` on every rank when some rank's value differs from
    rank 0's (``values`` as from :func:`gather_json`, so every rank decides alike)."""
    for rank, v in enumerate(values[1:], start=1):
        d = first_difference(_compared(values[0]), _compared(v))
        if d is not None:
            raise RankMismatchError(
                f"rank {rank} runs another {what} than rank 0: {_describe(*d, values[0], v)}; "
                "every rank stopped before merging anything",
                hint="start every rank with the same command line, SAE and corpus")


def _compared(value: Any) -> Any:
    return {k: v for k, v in value.items() if k != _SHOWN} if isinstance(value, dict) else value


def check_same_job(identity: Mapping[str, Any], dist: Dist,
                   device: torch.device | str = "cpu") -> None:
    """Before the first batch: every rank's :func:`job_identity` equals rank 0's."""
    if dist.world > 1:
        check_agree(gather_json(dict(identity), dist, device), "mining job")


class TokenDigest:
    """A running sha256 of every batch's token ids (and lengths), in corpus order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self.batches = 0

    def update(self, ids: torch.Tensor, lengths: torch.Tensor) -> None:
        self._h.update(ids.to(torch.int64).cpu().contiguous().numpy().tobytes())
        self._h.update(lengths.to(torch.int64).cpu().contiguous().numpy().tobytes())
        self.batches += 1

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def check_same_tokens(digest: TokenDigest, n_tokens: int, dist: Dist,
                      device: torch.device | str = "cpu") -> None:
    """After the last batch, before the merge: every rank read the same token ids as rank 0."""
    if dist.world == 1:
        return
    mine = {"batches": digest.batches, "tokens": n_tokens, "sha256": digest.hexdigest()[:32]}
    values = gather_json(mine, dist, device)
    for rank, v in enumerate(values[1:], start=1):
        if v != values[0]:
            same = v["tokens"] == values[0]["tokens"] and v["batches"] == values[0]["batches"]
            raise RankMismatchError(
                f"rank {rank} read other tokens than rank 0 ({v['tokens']:,} tokens in "
                f"{v['batches']} batches there, {values[0]['tokens']:,} in {values[0]['batches']} "
                f"on rank 0{', other token ids' if same else ''}): their corpora differ; every "
                "rank stopped before merging anything",
                hint="give every rank the same corpus")


def iter_digest(batches: Iterable[Any], digest: TokenDigest) -> Iterable[Any]:
    """``batches`` unchanged, each fed to ``digest`` on the way."""
    for b in batches:
        digest.update(b.ids, b.lengths)
        yield b


__all__ = ["TokenDigest", "check_agree", "check_same_job", "check_same_tokens",
           "corpus_identity", "file_identity", "first_difference", "gather_json",
           "iter_digest", "job_identity"]
