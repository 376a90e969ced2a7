"""Detection and fuzzing against a scripted endpoint: accuracies equal hand-computed values."""

from __future__ import annotations

import re

import pytest

from llamascope_sdk.base.endpoint import ChatClient
from llamascope_sdk.explain.examples import Context, ExampleSets, example_sets, round_robin
from llamascope_sdk.explain.prompts import (
    explainer_messages,
    marked,
    parse_explanation,
    parse_labels,
)
from llamascope_sdk.explain.scoring import balanced_accuracy, items_for, rng_for, score
from tests.explain_fixtures import ToyStore
from tests.fake_endpoint import FakeEndpoint

PREFIX = ["The", "A", "My", "One", "Her", "His"]
# six activating contexts: the feature fires on " cat" (index 2)
ACT = [Context((p, " black", " cat", " sat", "."), (0.0, 0.0, 3.0, 0.0, 0.0), d, 2)
       for d, p in enumerate(PREFIX)]
# four non-activating contexts
NON = [Context(("The", " old", " dog", " ran", "."), (0.0,) * 5, 10, 2),    # dog at index 2
       Context(("A", " small", " bird", " sang", "."), (0.0,) * 5, 11, 2),  # bird at index 2
       Context(("My", " red", " car", " is", "."), (0.0,) * 5, 12, 2),      # car at index 2
       Context(("One", " dog", " and", " one", "."), (0.0,) * 5, 13, 2)]    # dog at index 1
SETS = ExampleSets(explain=[], activating=ACT, non_activating=NON, source="deciles")

_EX = re.compile(r"^Example \d+: (.*)$", re.MULTILINE)


def reply(messages):
    """Detection: 1 if the excerpt has 'cat' or 'bird'. Fuzzing: 1 if the marked span has
    'cat', 'dog' or 'car'. Deterministic, imperfect on purpose."""
    system, user = messages[0]["content"], messages[1]["content"]
    excerpts = _EX.findall(user)
    if "marked between" in system:
        hits = [any(w in span for span in re.findall(r"<<(.*?)>>", e) for w in ("cat", "dog", "car"))
                for e in excerpts]
    else:
        hits = [("cat" in e or "bird" in e) for e in excerpts]
    return "[" + ", ".join(str(int(h)) for h in hits) + "]"


def test_detection_and_fuzzing_equal_hand_computed_accuracies():
    with FakeEndpoint(reply=reply, lifetime=30) as fake:
        client = ChatClient(fake.url, "scorer", concurrency=2)
        det = score(client, "detection", "the word cat", SETS, feature=7)
        fuz = score(client, "fuzzing", "the word cat", SETS, feature=7)
    # detection, by hand: all 6 activating contain "cat" -> TP 6, FN 0; of the 4 others only
    # the bird one says 1 -> FP 1, TN 3. Balanced accuracy (6/6 + 3/4) / 2.
    assert (det["tp"], det["fn"], det["tn"], det["fp"]) == (6, 0, 3, 1)
    assert det["balanced_accuracy"] == pytest.approx((6 / 6 + 3 / 4) / 2)  # 0.875
    # fuzzing, by hand: every activating context fired only at index 2, so each negative is
    # marked at index 2: " dog" (1), " bird" (0), " car" (1), " and" (0) -> FP 2, TN 2.
    assert (fuz["tp"], fuz["fn"], fuz["tn"], fuz["fp"]) == (6, 0, 2, 2)
    assert fuz["balanced_accuracy"] == pytest.approx((6 / 6 + 2 / 4) / 2)  # 0.75
    # 10 items, 5 per request -> 2 requests each; nothing unparsable
    assert (det["requests"], fuz["requests"], det["unparsable_batches"]) == (2, 2, 0)
    assert det["n_scored"] == fuz["n_scored"] == 10
    assert len(fake.requests) == 4


def test_unparsable_batches_are_left_out_and_counted():
    answers = iter(["I think yes", "[1, 1, 1, 1, 1]"])
    with FakeEndpoint(reply=lambda m: next(answers), lifetime=30) as fake:
        client = ChatClient(fake.url, "scorer", concurrency=1)
        det = score(client, "detection", "cats", SETS, feature=3)
    # which items landed in the parsed batch is fixed by the seeded shuffle: recompute it
    items = items_for("detection", SETS, rng_for(0, 3, "detection"))
    second = items[5:]
    pos = sum(it.label for it in second)
    assert det["unparsable_batches"] == 1 and client.usage.unparsable == 1
    assert det["n_scored"] == 5 and (det["tp"], det["fp"]) == (pos, 5 - pos)
    want = None if pos in (0, 5) else (1.0 + 0.0) / 2
    assert det["balanced_accuracy"] == want
    assert len(fake.requests) == 2


def test_balanced_accuracy_by_hand():
    # 3 positives (2 right), 5 negatives (4 right): (2/3 + 4/5) / 2
    r = balanced_accuracy([1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 1])
    assert r["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert balanced_accuracy([1, 1], [1, 0])["balanced_accuracy"] is None  # no negative


def test_parsers_refuse_rather_than_guess():
    assert parse_labels("Sure: [1, 0, true, 0, 1] done", 5) == [1, 0, 1, 0, 1]
    for bad in ("1 0 1 0 1", "[1, 0, 1]", "[1, 0, 2, 0, 1]", "[1, 0, 0.5, 0, 1]", "[a, b]"):
        with pytest.raises(ValueError):
            parse_labels(bad, 5)
    assert parse_explanation('\n  Explanation: "the word cat"\nmore') == "the word cat"
    with pytest.raises(ValueError):
        parse_explanation("   \n ")


def test_marks_and_activation_scale_in_the_explainer_prompt():
    c = Context(("a", " big", " cat", " cat", "\n"), (0.0, 1.0, 0.0, 4.0, 2.0))
    assert marked(c) == "a<< big>> cat<< cat\u21b5>>"
    user = explainer_messages([c])[1]["content"]
    assert "Example 1: a<< big>> cat<< cat\u21b5>>" in user
    assert "Activations: big 2, cat 10, \u21b5 5" in user  # 10 * act / 4, at least 1


def test_held_out_split_never_shows_scored_contexts_to_the_explainer():
    store = ToyStore(per_decile=4, n_non=30)
    sets = example_sets(store, 2, n_explain=12, n_score=15)
    assert len(sets.explain) == 12 and len(sets.activating) == 15 and len(sets.non_activating) == 15
    assert not {c.key for c in sets.explain} & {c.key for c in sets.activating}
    # round robin from the highest decile: the first 10 explained come from 10 different deciles
    assert [round(max(c.acts)) for c in sets.explain[:10]] == list(range(10, 0, -1))
    assert round_robin([[1, 2], [3], [4, 5, 6]], 5) == [1, 3, 4, 2, 5]  # type: ignore[list-item]


def test_old_store_explains_from_top_and_says_how_to_rescore():
    class Old:
        meta = {"version": 1, "sae_spec": "L3R-8x"}

        def examples(self, i, which="top"):
            base = 0 if which == "top" else 2
            return [{"tokens": ["x"], "acts": [1.0], "doc": base + k, "pos": 0} for k in range(4)]

    sets = example_sets(Old(), 0)
    assert [c.doc for c in sets.explain] == [0, 1, 2, 3]
    assert [c.doc for c in sets.activating] == [4, 5]  # samples minus those shown
    assert sets.non_activating == [] and "llamascope inspect --sae L3R-8x" in (sets.note or "")


_ONE = re.compile(r'^Text: "(.*)"$', re.MULTILINE)


def test_one_context_per_request_gives_the_same_hand_computed_accuracies():
    """--scorer-batch 1: one yes/no question per excerpt, answered by a word; the accuracies
    equal the batched ones above (the scripted judgement is the same)."""
    words = iter(["Yes.", "1", "no", "0 - it does not", "YES", "No, because"] * 10)

    def one(messages):
        (msg,) = messages
        user = msg["content"]
        assert msg["role"] == "user" and "Answer Yes or No." in user and "Example 1" not in user
        (e,) = _ONE.findall(user)
        if "between << and >>" in user:
            hit = any(w in span for span in re.findall(r"<<(.*?)>>", e) for w in ("cat", "dog", "car"))
        else:
            hit = "cat" in e or "bird" in e
        word = next(words)
        while (word.lower().startswith(("1", "yes"))) != hit:  # a yes/no word of the right sign
            word = next(words)
        return word

    with FakeEndpoint(reply=one, lifetime=30) as fake:
        client = ChatClient(fake.url, "scorer", concurrency=2)
        det = score(client, "detection", "the word cat", SETS, feature=7, batch=1)
        fuz = score(client, "fuzzing", "the word cat", SETS, feature=7, batch=1)
    assert (det["tp"], det["fn"], det["tn"], det["fp"]) == (6, 0, 3, 1)
    assert (fuz["tp"], fuz["fn"], fuz["tn"], fuz["fp"]) == (6, 0, 2, 2)
    assert det["requests"] == fuz["requests"] == 10 and len(fake.requests) == 20
    assert det["unparsable_batches"] == fuz["unparsable_batches"] == 0


def test_one_word_answers_parse_only_when_they_come_first():
    assert parse_labels("Yes, it does.", 1, single=True) == [1]
    assert parse_labels("0", 1, single=True) == [0]
    assert parse_labels("[1]", 1, single=True) == [1]
    assert parse_labels("false", 1, single=True) == [0]
    for bad in ("I think yes", "The answer is 1", "", "maybe", "2"):
        with pytest.raises(ValueError):
            parse_labels(bad, 1, single=True)
    with pytest.raises(ValueError):
        parse_labels("yes", 1)  # the list format (a batch's last, 1-item request) needs a list
