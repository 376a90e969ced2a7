"""First-letter absorption on a constructed SAE whose chosen features absorb "starts with S".

The SAE (d_model 32, 8 features, scales 1, so features are h_i = <e_i, x> where above the
threshold) is built with ``SAE.from_raw``:

* feature 0, the main "S" feature: encoder 2 * e1, decoder e0 (the probe direction);
* feature 1, the absorber: encoder 3 * e2, decoder (e0 + e2) / sqrt 2 (cos 0.707 with the probe);
* features 2..7: encoders and decoders on e3..e8, orthogonal to the probe.

S words are 2 e0 + e1 (the main feature fires, 2 x 1 = a: not absorbed) or, for the chosen
tokens, 2 e0 + e2 (the main feature is silent and the absorber carries 3 x 0.707 >= 0.4 a:
fully absorbed). With 5 chosen tokens among 20 S words both scores are 5/20 exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from llamascope_sdk.benchmark import absorption as A
from tests.helpers import release_hyperparams

D_MODEL, D_SAE = 32, 8


def _constructed_sae():  # type: ignore[no-untyped-def]
    from llamascope_sdk.loading.sae import SAE

    hp = release_hyperparams(layer=1, position="R", d_model=D_MODEL, d_sae=D_SAE, threshold=0.1,
                             norm_in=math.sqrt(D_MODEL), norm_out=math.sqrt(D_MODEL))
    hp["top_k"] = 4
    enc = torch.zeros(D_SAE, D_MODEL)
    dec = torch.zeros(D_MODEL, D_SAE)  # columns are features
    enc[0, 1], dec[0, 0] = 2.0, 1.0
    enc[1, 2] = 3.0
    dec[0, 1] = dec[2, 1] = 1 / math.sqrt(2)
    for j in range(2, D_SAE):
        enc[j, j + 1], dec[j + 1, j] = 1.0, 1.0
    tensors = {"encoder.weight": enc, "encoder.bias": torch.zeros(D_SAE),
               "decoder.weight": dec, "decoder.bias": torch.zeros(D_MODEL)}
    return SAE.from_raw(hp, tensors)


def _s_words(n: int, absorbed: set[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(n, D_MODEL)
    x[:, 0] = 2.0
    for i in range(n):
        x[i, 2 if i in absorbed else 1] = 1.0
    x[:, 3:9] = torch.rand(n, 6, generator=g)  # other features fire too, orthogonal to the probe
    return x


def test_constructed_fraction_is_returned_exactly() -> None:
    sae = _constructed_sae()
    chosen = {1, 4, 9, 13, 17}
    probe = torch.zeros(D_MODEL)
    probe[0] = 3.0  # any length: the metric normalises it
    r = A.letter_result("s", sae, _s_words(20, chosen), probe, [0], probe_f1=1.0)
    assert r.n_probe_true_positives == 20
    assert r.mean_absorption_fraction == 5 / 20
    assert r.full_absorption_rate == 5 / 20 and r.num_full_absorption == 5
    frac, full, n_split = A.aggregate([r])
    assert (frac, full, n_split) == (0.25, 0.25, 1.0)


def test_letters_below_the_probe_f1_gate_are_left_out() -> None:
    sae = _constructed_sae()
    probe = torch.zeros(D_MODEL)
    probe[0] = 1.0
    good = A.letter_result("s", sae, _s_words(10, {0, 1}), probe, [0], probe_f1=0.9)
    bad = A.letter_result("t", sae, _s_words(10, set(range(10))), probe, [0], probe_f1=0.5)
    assert bad.mean_absorption_fraction == 1.0
    assert A.aggregate([good, bad])[0] == pytest.approx(0.2)
    assert all(math.isnan(v) for v in A.aggregate([bad]))


def test_partial_absorption_fraction_by_hand() -> None:
    """x = 2 e0 + 0.5 e1 + e2: main f0 = 1 (projection 1), absorber f1 = 3 (projection
    2.121); a = 2, so the unexplained part is 1 and the fraction min(2.121, 1) / (1 + 1) = 0.5;
    not full absorption (the main feature fired)."""
    sae = _constructed_sae()
    x = torch.zeros(D_MODEL)
    x[0], x[1], x[2] = 2.0, 0.5, 1.0
    p = torch.zeros(D_MODEL)
    p[0] = 1.0
    f = sae.encode(x[None])[0]
    cos = torch.nn.functional.cosine_similarity(p[None], sae.W_dec.float(), dim=-1)
    assert float(f[0]) == pytest.approx(1.0) and float(f[1]) == pytest.approx(3.0)
    s = A.word_score(f, 2.0, cos, [0])
    assert s.absorption_fraction == pytest.approx(0.5) and s.full_absorption is False
    # below the 0.4 share: a weaker absorber is not absorption
    weak = f.clone()
    weak[1] = 0.5  # projection 0.354 < 0.4 * 2
    assert A.word_score(weak, 2.0, cos, [0]).absorption_fraction == 0.0


def test_feature_splitting_rule_adds_features_while_f1_jumps() -> None:
    """Feature 0 alone misses the absorbed S words (test F1 0.79); adding the absorber finds all
    (F1 1.0, a jump above 0.03), so both count as main features; feature 2 adds nothing."""
    sae = _constructed_sae()
    s_words = _s_words(40, set(range(0, 40, 3)))  # absorbed words in train and test
    others = torch.zeros(40, D_MODEL)
    others[:, 3:9] = torch.rand(40, 6, generator=torch.Generator().manual_seed(1))
    x = torch.cat([s_words, others])
    y = torch.cat([torch.ones(40), torch.zeros(40)])
    f = sae.encode(x)
    tr = torch.arange(0, 80, 2)
    te = torch.arange(1, 80, 2)
    main = A.split_features(f[tr], y[tr], f[te], y[te].bool(), torch.tensor([0, 1, 2]), seed=0)
    assert main == [0, 1]


def test_prompts_and_words() -> None:
    assert A.first_letter(" Sun") == "s"
    p = A.prompt(" sun", [" cat", " dog"])
    assert p.endswith(" sun has the first letter:")
    assert "\n cat has the first letter: C\n" in p
    ps = A.prompts_for([" a", " b", " c", " d", " e", " f", " g", " h", " i", " j", " k", " l"], 1)
    assert all(p.count("\n") == A.N_ICL + 1 for p in ps)
    assert all(not any(line.startswith(" a has") for line in p.split("\n")[1:-1])
               for p in ps[:1])  # the word itself is never one of its examples
