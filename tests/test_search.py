"""Search scores (tf-idf-like and --vs) and the dense-feature rule."""

from __future__ import annotations

import math

import pytest
import torch

from llamascope_sdk.core.feature_stats import FeatureStats
from llamascope_sdk.store.search import score_features
from llamascope_sdk.store.view import steer_command


def stats(freq, typical, n=1000):
    freq, typical = torch.tensor(freq), torch.tensor(typical)
    return FeatureStats(mean=freq * typical, typical=typical, frequency=freq, n_tokens=n)


def test_score_is_relative_activation_times_idf():
    st = stats([0.01, 0.01, 0.9, 0.0], [2.0, 10.0, 5.0, 0.0])
    pm = torch.tensor([2.0, 2.0, 5.0, 3.0])
    s = score_features(pm, st)
    assert s[0] == pytest.approx(1.0 * -math.log(0.01))
    assert s[1] == pytest.approx(0.2 * -math.log(0.01))  # fires below its usual size
    assert s[2] == pytest.approx(1.0 * -math.log(0.9))  # everywhere: tiny
    assert s[3] == pytest.approx(1.0 * math.log(1001))  # never seen in mining: rare
    vs = score_features(pm, st, torch.tensor([1.0, 0.0, 5.0, 0.0]))
    assert vs.tolist() == [1.0, 2.0, 0.0, 3.0]


def test_steer_command():
    assert steer_command("demo", 4154, relative=True, typical=14.0) == \
        "llamascope steer --sae demo -f 4154 --relative -a 4"
    assert steer_command("L15R-8x", 7, relative=False, typical=2.5) == \
        "llamascope steer --sae L15R-8x -f 7 -a 10.0"


@pytest.mark.smollm
def test_search_demo_finds_the_shakespeare_feature_and_hides_dense(smollm2):
    from llamascope_sdk.loading.sae import SAE
    from llamascope_sdk.store.search import search_features

    model, tok = smollm2
    sae = SAE.from_pretrained("demo")
    text = "O Romeo, Romeo, wherefore art thou Romeo? Deny thy father and refuse thy name."
    hits = search_features(model, tok, sae, text, top=10)
    assert hits and all(not h.dense for h in hits)
    assert all(h.frequency <= 0.5 for h in hits)
    with_dense = search_features(model, tok, sae, text, top=4608, include_dense=True)
    dense = [h for h in with_dense if h.frequency > 0.5]
    assert all(h.dense for h in dense)
    vs = search_features(model, tok, sae, text, vs="The stock market rose by two percent today.",
                         top=10, include_dense=True)
    assert 1297 in [h.feature for h in vs] or 4154 in [h.feature for h in vs]
    assert vs[0].score == pytest.approx(vs[0].prompt_mean - vs[0].vs_mean)
