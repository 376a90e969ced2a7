"""The explain run: records, cost estimate vs reported usage, resume after a real SIGKILL."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamascope_sdk.base.endpoint import ChatClient, TokenBudgetExceeded
from llamascope_sdk.base.errors import InputError
from llamascope_sdk.explain import Settings, descriptions, explain_features, plan_run
from llamascope_sdk.explain.prompts import PROMPT_VERSION
from tests.explain_fixtures import WORDS, ToyStore, scripted_reply
from tests.fake_endpoint import Delay, FakeEndpoint, Malformed, Status, count_words

REPO = Path(__file__).resolve().parents[1]
SETTINGS = Settings(n_score=10)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_records_hold_explanation_scores_model_prompt_and_examples(tmp_path):
    store = ToyStore(tmp_path / "store", dead=5)
    with FakeEndpoint(reply=scripted_reply, lifetime=60) as fake:
        client = ChatClient(fake.url, "toy/model:1", concurrency=3)
        res = explain_features(store, [0, 1, 5], client, settings=SETTINGS)
    folder = tmp_path / "store" / "explanations" / "toy_model_1"
    assert res.folder == folder and res.written == [0, 1, 5]
    rec = json.loads((folder / "features" / "1.json").read_text())
    assert rec["explanation"] == f"the word {WORDS[1]} in a short sentence"
    assert (rec["model"], rec["prompt_version"]) == ("toy/model:1", PROMPT_VERSION)
    assert rec["scores"]["detection"]["balanced_accuracy"] == 1.0
    assert rec["scores"]["fuzzing"]["balanced_accuracy"] == 1.0
    used = rec["examples"]
    assert len(used["explain"]) == 10 and len(used["activating"]) == 10
    assert len(used["non_activating"]) == 10
    assert not {(e["doc"], e["pos"]) for e in used["explain"]} & {
        (e["doc"], e["pos"]) for e in used["activating"]}
    dead = json.loads((folder / "features" / "5.json").read_text())
    assert dead["explanation"] is None and "never fired" in dead["note"]
    # per-feature tokens add up to what the client counted
    recs = [json.loads((folder / "features" / f"{i}.json").read_text()) for i in (0, 1, 5)]
    assert sum(r["prompt_tokens"] for r in recs) == res.usage["prompt_tokens"] == fake.usage["prompt_tokens"]
    # 1 explain + 4 detection + 4 fuzzing requests per live feature (20 items, 5 per request)
    assert res.usage["requests"] == len(fake.requests) == 2 * 9
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "toy/model:1" and config["n_score"] == 10
    assert {i: r["explanation"] for i, r in descriptions(tmp_path / "store").items()} == {
        0: f"the word {WORDS[0]} in a short sentence", 1: f"the word {WORDS[1]} in a short sentence"}


def test_estimate_is_within_ten_percent_of_reported_usage(tmp_path):
    store = ToyStore(tmp_path / "store", per_decile=4, n_non=30)
    # the fake counts template tokens as a ChatML server does (5 per message, 3 per request);
    # the estimate uses the OpenAI rule (4 and 3): the test measures that gap too
    plan = plan_run(store, range(6), "m", settings=Settings(n_score=20), count_tokens=count_words)
    with FakeEndpoint(reply=scripted_reply, per_message=5, per_request=3, lifetime=60) as fake:
        client = ChatClient(fake.url, "m", concurrency=4)
        explain_features(store, range(6), client, settings=Settings(n_score=20))
    assert plan.estimate.requests == len(fake.requests) == 6 * (1 + 8 + 8)
    reported = fake.usage["prompt_tokens"] + fake.usage["completion_tokens"]
    assert abs(plan.estimate.total_tokens - reported) / reported < 0.10
    assert abs(plan.estimate.prompt_tokens - fake.usage["prompt_tokens"]) / fake.usage["prompt_tokens"] < 0.10
    # a second plan sees nothing left to do
    again = plan_run(store, range(6), "m", settings=Settings(n_score=20), count_tokens=count_words)
    assert again.todo == [] and again.estimate.requests == 0 and again.skipped == list(range(6))


@pytest.mark.smollm
def test_chat_template_count_matches_a_server_of_that_model(tmp_path, smollm2):
    """With the model's tokenizer, whole requests are counted through its chat template (what
    a server running it reports: SmolLM2's template adds a default system message), so the
    prompt estimate is near exact; the per-message rule misses that system message."""
    from llamascope_sdk.explain.cost import EXPLANATION_GUESS, template_counter, tokenizer_counter
    from llamascope_sdk.explain.prompts import EXPLAIN_SYSTEM

    _, tok = smollm2
    by_template = template_counter(tok)
    assert by_template is not None
    store = ToyStore(tmp_path / "store", per_decile=4, n_non=30)
    settings = Settings(n_score=20)
    plan = plan_run(store, range(4), "m", settings=settings, count_tokens=tokenizer_counter(tok),
                    count_messages=by_template)
    rule = plan_run(store, range(4), "m", settings=settings, count_tokens=tokenizer_counter(tok))
    def reply(messages):  # the explainer writes exactly the estimate's guess
        if messages[0]["content"] == EXPLAIN_SYSTEM:
            return EXPLANATION_GUESS
        n = len(re.findall(r"^Example \d+: ", messages[-1]["content"], re.MULTILINE))
        return "[" + ", ".join(["0"] * n) + "]"

    with FakeEndpoint(reply=reply, count_messages=by_template, lifetime=60) as fake:
        explain_features(store, range(4), ChatClient(fake.url, "m", concurrency=4),
                         settings=settings)
    reported = fake.usage["prompt_tokens"]
    assert plan.estimate.requests == len(fake.requests) == 4 * (1 + 8 + 8)  # 40 items, 5 each
    assert plan.estimate.prompt_tokens == reported  # every prompt counted as the server does
    assert rule.estimate.requests == plan.estimate.requests
    # a user-only request (the --scorer-batch 1 form) gets SmolLM2's default system message,
    # which a per-message rule cannot know about
    user_only = [{"role": "user", "content": "Is this about cats? Answer Yes or No."}]
    assert by_template(user_only) > tokenizer_counter(tok)(user_only[0]["content"]) + 20
    assert plan.estimate.completion_max == 4 * (60 + 16 * 5 * 8)


def test_rerun_skips_done_features_and_refuses_other_settings(tmp_path):
    store = ToyStore(tmp_path / "store")
    with FakeEndpoint(reply=scripted_reply, lifetime=60) as fake:
        client = ChatClient(fake.url, "m")
        explain_features(store, [0, 1], client, settings=SETTINGS)
        n = len(fake.requests)
        res = explain_features(store, [0, 1, 2], client, settings=SETTINGS)
        assert res.skipped == [0, 1] and res.written == [2]
        assert len(fake.requests) == n + 9
        with pytest.raises(InputError, match="other settings .*n_score"):
            explain_features(store, [3], client, settings=Settings(n_score=12))


def test_unparsable_explanation_is_recorded_not_scored(tmp_path):
    store = ToyStore(tmp_path / "store")
    with FakeEndpoint(reply=scripted_reply, script=[Malformed()], lifetime=60) as fake:
        client = ChatClient(fake.url, "m")
        res = explain_features(store, [0], client, settings=SETTINGS)
    rec = json.loads((res.folder / "features" / "0.json").read_text())
    assert rec["explanation"] is None and rec["scores"] is None and "could not be parsed" in rec["note"]
    assert res.unparsable_explanations == 1 and client.usage.unparsable == 1
    assert len(fake.requests) == 1


def test_retries_inside_a_run_and_token_budget(tmp_path):
    store = ToyStore(tmp_path / "store")
    with FakeEndpoint(reply=scripted_reply, script=[Status(429, "0"), Status(503)], lifetime=60) as fake:
        client = ChatClient(fake.url, "m", backoff=0.01, concurrency=1)
        res = explain_features(store, [0], client, settings=SETTINGS)
        assert res.usage["retries"] == 2 and res.written == [0]
        small = ChatClient(fake.url, "m2", token_budget=1)
        with pytest.raises(TokenBudgetExceeded):
            explain_features(store, [1, 2], small, settings=SETTINGS)
    done = sorted(p.name for p in (tmp_path / "store" / "explanations" / "m2" / "features").glob("*.json"))
    assert done == []  # the first request spent the budget; no feature was finished


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes(tmp_path):
    """A real SIGKILL at a random moment, then a rerun: the same files, byte for byte, as a
    run that was never interrupted."""
    slow = lambda m: Delay(0.1, scripted_reply(m))  # noqa: E731
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random()
    with FakeEndpoint(reply=slow, lifetime=300) as fake:
        whole = tmp_path / "whole"
        subprocess.run([sys.executable, "-m", "tests.explain_fixtures", fake.url, str(whole)],
                       cwd=REPO, env=env, check=True, timeout=120, capture_output=True)
        killed = tmp_path / "killed"
        proc = subprocess.Popen([sys.executable, "-m", "tests.explain_fixtures", fake.url,
                                 str(killed)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
        # a random moment inside the run: after a random number of finished features (0-4),
        # then a random fraction of the time one feature takes
        wait_for, seen = rng.randrange(5), 0
        assert proc.stderr is not None
        while seen < wait_for:
            line = proc.stderr.readline()
            assert line, "the run ended before it could be killed"
            seen += "feature" in line
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        before = tree(killed) if killed.exists() else {}
        subprocess.run([sys.executable, "-m", "tests.explain_fixtures", fake.url, str(killed)],
                       cwd=REPO, env=env, check=True, timeout=120, capture_output=True)
    written = [k for k in before if "/features/" in k and k.endswith(".json")]
    print(f"killed after {seen} progress lines, {len(written)} of 6 feature files on disk")
    assert len(written) < 6
    assert tree(killed) == tree(whole)
    assert len([k for k in tree(whole) if k.endswith(".json")]) == 7  # config + 6 features
