"""Constructed features and a deterministic scripted explainer/scorer for the explain tests.

``ToyStore`` has the reading API of a version-2 feature store (``decile_examples``,
``non_activating``, ``examples``): feature f fires on the word ``WORDS[f]`` at index 2 of every
activating context. ``scripted_reply`` answers like a perfect, deterministic LLM: the
explainer names the marked word, detection says 1 when the described word is in the excerpt,
fuzzing says 1 when it is inside the marks. ``python -m tests.explain_fixtures URL FOLDER``
runs :func:`explain_features` on all features (the resume test kills it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

WORDS = ["cat", "sun", "tree", "milk", "road", "lamp"]
PREFIXES = ["The", "A", "My", "One", "Her", "His", "Our", "That", "This", "Some"]
OTHER = [" dog", " car", " bird", " hat", " cup", " box", " pen", " key", " bag", " map"]


def context(tokens: list[str], acts: list[float], doc: int, pos: int) -> dict[str, Any]:
    m = max(range(len(acts)), key=acts.__getitem__)
    return {"tokens": tokens, "token_ids": list(range(len(tokens))), "acts": acts,
            "max": acts[m], "max_index": m, "doc": doc, "pos": pos, "window_start": pos - m}


class ToyStore:
    """A version-2 store with ``d_sae`` features, ``per_decile`` examples in each of 10 deciles
    and ``n_non`` non-activating contexts per feature; feature ``dead`` never fired."""

    def __init__(self, path: Path | None = None, d_sae: int = 6, per_decile: int = 2,
                 n_non: int = 10, dead: int | None = None) -> None:
        self.meta = {"version": 2, "sae": "toy-sae", "sae_spec": "toy-sae", "d_sae": d_sae}
        self.name = "toy-sae"
        self.path = path
        self.d_sae = d_sae
        self.per_decile = per_decile
        self.n_non = n_non
        self.dead = dead

    def check_feature(self, i: int) -> int:
        if not 0 <= int(i) < self.d_sae:
            raise IndexError(f"feature {i} out of range")
        return int(i)

    def decile_examples(self, i: int) -> list[dict[str, Any]]:
        out = []
        for d in range(10, 0, -1):
            exs = []
            if i != self.dead:
                for k in range(self.per_decile):
                    n = d * 10 + k
                    toks = [PREFIXES[n % 10], OTHER[(n + i) % 10], " " + WORDS[i], " sat", "."]
                    exs.append(context(toks, [0.0, 0.0, float(d) - 0.1 * k, 0.0, 0.0],
                                       doc=100 * i + n, pos=2))
            out.append({"decile": d, "lo": d - 0.5, "hi": float(d), "examples": exs})
        return out

    def non_activating(self, i: int) -> list[dict[str, Any]]:
        if i == self.dead:
            return []
        return [context([PREFIXES[k % 10], OTHER[k % 10], OTHER[(k + 3) % 10], " ran", "."],
                        [0.0] * 5, doc=9000 + 10 * i + k, pos=3) for k in range(self.n_non)]

    def examples(self, i: int, which: str = "top") -> list[dict[str, Any]]:
        return [e for d in self.decile_examples(i) for e in d["examples"]][:5]


_EXAMPLE = re.compile(r"^Example \d+: (.*)$", re.MULTILINE)
_MARKED = re.compile(r"<<(.*?)>>")


def scripted_reply(messages: list[dict[str, str]]) -> str:
    """A perfect, deterministic explainer and scorer for ToyStore's features."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if "Answer with one short phrase" in system:
        marked = _MARKED.findall(user)
        return f"the word {marked[0].strip()} in a short sentence"
    word = re.search(r"Description: the word (\w+)", user)
    assert word is not None, user
    excerpts = _EXAMPLE.findall(user)
    if "marked between" in system:  # fuzzing
        hits = [any(word.group(1) in m for m in _MARKED.findall(e)) for e in excerpts]
    else:
        hits = [word.group(1) in e for e in excerpts]
    return "[" + ", ".join("1" if h else "0" for h in hits) + "]"


def main(url: str, folder: str) -> None:
    from llamascope_sdk.base.endpoint import ChatClient
    from llamascope_sdk.explain import Settings, explain_features

    store = ToyStore(Path(folder))
    client = ChatClient(url, "toy-model", concurrency=2, backoff=0.01)
    explain_features(store, range(store.d_sae), client, settings=Settings(n_score=10),
                     progress=lambda line: print(line, file=sys.stderr, flush=True))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
