"""The explainer and scorer prompts (versioned) and the parsers of their replies.

The explainer sees contexts with the tokens the feature fires on between ``<<`` and ``>>``
(runs of consecutive firing tokens share one pair), and below each context those tokens with
the activation on a 0-10 scale (10 = the largest activation among the contexts shown), as in
Bills et al. (2023) and delphi. Scorers get numbered contexts, five per request by default, and
answer with a list of 0s and 1s in order (``[1, 0, 0, 1, 0]``); with one context per request
(``--scorer-batch 1``, a format small local models can follow) the question ends in "Answer Yes
or No." and the reply's first word is the answer (yes/no, 1/0, true/false). Anything else is unparsable: counted,
never guessed. Changing any text here changes :data:`PROMPT_VERSION`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence

from llamascope_sdk.explain.examples import Context

PROMPT_VERSION = "llamascope-explain-2"

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher studying one feature inside a language model. "
    "You are shown text excerpts on which the feature fires. The tokens it fires on are "
    "between << and >>; under each excerpt they are listed with the feature's activation on "
    "a scale of 0 to 10. Find what the marked tokens have in common, and the context that "
    "makes the feature fire when that matters. Answer with one short phrase (at most 15 "
    "words) that describes it. Do not list the examples and do not mention activations.")

DETECTION_SYSTEM = (
    "You are an interpretability researcher checking a description of a language-model "
    "feature. You get the description and numbered text excerpts. For each excerpt decide "
    "whether the feature fires anywhere in it, that is, whether the excerpt contains what "
    "the description describes. Reply with a list of 0s and 1s, one per excerpt in order, "
    "for example [1, 0, 0, 1, 0], and nothing else.")

FUZZING_SYSTEM = (
    "You are an interpretability researcher checking a description of a language-model "
    "feature. You get the description and numbered text excerpts in which some tokens are "
    "marked between << and >>. For each excerpt decide whether the marked tokens are the ones "
    "the description applies to (1) or were marked at random (0). Reply with a list of 0s and "
    "1s, one per excerpt in order, for example [1, 0, 0, 1, 0], and nothing else.")

#: One excerpt per request (``--scorer-batch 1``): a user message only, ending in a yes/no
#: question, the form even a 135M chat model answers with a leading "Yes" or "No".
SINGLE_DETECTION = ('Text: "{text}"\nDescription: {explanation}\nQuestion: does the text '
                    "contain what the description describes? Answer Yes or No.")
SINGLE_FUZZING = ('Text: "{text}"\nDescription: {explanation}\nQuestion: do the marked words '
                  "(between << and >>) match the description? Answer Yes or No.")

_WORD = re.compile(r"[A-Za-z0-9]+")
_ONE_WORD = {"1": 1, "0": 0, "yes": 1, "no": 0, "true": 1, "false": 0}
_LIST = re.compile(r"\[[^\[\]]*\]")
_PREFIX = re.compile(r"^(explanation|description|answer|feature)\s*[:\-]\s*", re.IGNORECASE)


def visible(token: str) -> str:
    """A token as written into a prompt: newlines shown as a symbol, so one excerpt is one line."""
    return token.replace("\r", "").replace("\n", "\u21b5")


def marked(ctx: Context, highlight: Collection[int] | None = None) -> str:
    """The context's text with the tokens at ``highlight`` (default: where the feature fired)
    between ``<<`` and ``>>``, consecutive ones sharing a pair."""
    on = set(highlight) if highlight is not None else {k for k, a in enumerate(ctx.acts) if a > 0}
    out: list[str] = []
    for k, tok in enumerate(ctx.tokens):
        if k in on and k - 1 not in on:
            out.append("<<")
        out.append(visible(tok))
        if k in on and k + 1 not in on:
            out.append(">>")
    return "".join(out)


def plain(ctx: Context) -> str:
    return "".join(visible(t) for t in ctx.tokens)


def explainer_messages(contexts: Sequence[Context]) -> list[dict[str, str]]:
    """The explainer conversation for ``contexts`` (activating, strongest decile first)."""
    top = max((a for c in contexts for a in c.acts), default=0.0)
    parts = []
    for n, c in enumerate(contexts, 1):
        acts = ", ".join(f"{visible(t).strip() or repr(t)} {_scale(a, top)}"
                         for t, a in zip(c.tokens, c.acts, strict=True) if a > 0)
        parts.append(f"Example {n}: {marked(c)}\nActivations: {acts}")
    user = "Excerpts:\n\n" + "\n\n".join(parts) + "\n\nDescription (one line):"
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, {"role": "user", "content": user}]


def _scale(a: float, top: float) -> int:
    return max(1, round(10 * a / top)) if top > 0 else 0


def scorer_messages(kind: str, explanation: str, texts: Sequence[str],
                    single: bool = False) -> list[dict[str, str]]:
    """A detection or fuzzing request: the explanation and numbered excerpts, or with
    ``single`` (one excerpt per request) a yes/no question about ``texts[0]``."""
    if single:
        if len(texts) != 1:
            raise ValueError(f"single: one excerpt per request, got {len(texts)}")
        form = SINGLE_DETECTION if kind == "detection" else SINGLE_FUZZING
        return [{"role": "user", "content": form.format(text=texts[0], explanation=explanation)}]
    system = DETECTION_SYSTEM if kind == "detection" else FUZZING_SYSTEM
    body = "\n".join(f"Example {n}: {t}" for n, t in enumerate(texts, 1))
    user = (f"Description: {explanation}\n\n{body}\n\n"
            f"Answer with a list of exactly {len(texts)} numbers:")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_explanation(text: str) -> str:
    """The first non-empty line of the reply, without a leading ``Explanation:`` and quotes.

    Raises:
        ValueError: nothing left, or longer than 300 characters (not a description).
    """
    for line in text.strip().splitlines():
        line = _PREFIX.sub("", line.strip().strip("*#` ")).strip().strip("\"'\u201c\u201d ")
        if line:
            if len(line) > 300:
                raise ValueError("the description is longer than 300 characters")
            return line
    raise ValueError("empty reply")


def parse_labels(text: str, n: int, single: bool = False) -> list[int]:
    """The first ``[...]`` in the reply as ``n`` labels, each 0 or 1 (true/false accepted);
    with ``single``, the reply's first word (yes/no, 1/0, true/false) or a one-label list.

    Raises:
        ValueError: no list, not JSON, the wrong length, or a value other than 0/1; with
        ``single``, a reply whose first word is not an answer.
    """
    m = _LIST.search(text)
    if m is None and single and n == 1:
        # one excerpt: the reply's first word, if it is an answer (never a later word)
        w = _WORD.search(text)
        if w is not None and w.group(0).lower() in _ONE_WORD:
            return [_ONE_WORD[w.group(0).lower()]]
        raise ValueError("the reply does not start with 1, 0, yes or no")
    if m is None:
        raise ValueError("no [...] list in the reply")
    try:
        values = json.loads(m.group(0).replace("True", "true").replace("False", "false"))
    except ValueError:
        raise ValueError("the list is not JSON") from None
    if len(values) != n:
        raise ValueError(f"{len(values)} labels for {n} excerpts")
    out = []
    for v in values:
        if v in (0, 1) and not isinstance(v, float):
            out.append(int(v))
        else:
            raise ValueError(f"label {v!r} is not 0 or 1")
    return out


def expected_answer(n: int, single: bool = False) -> str:
    """What a well-formed scorer reply for ``n`` excerpts looks like (for cost estimates)."""
    if single:
        return "Yes"
    return "[" + ", ".join("1" if k % 2 == 0 else "0" for k in range(n)) + "]"
