"""SAEBench's first-letter feature absorption (Chanin et al. 2024; absorption fraction by
Demian Till), on any SAE the SDK loads.

**Not meaningful below about 1B parameters or 16k features** (SAEBench's own warning): a small
model spells badly (few letters pass the probe-F1 gate) and a narrow SAE has little room to
absorb; a randomly initialised or undertrained SAE scores low, which does not mean it avoids
absorption.

Definition, as SAEBench computes it (``evals/absorption``):

1. **Words**: the tokenizer's single tokens made only of ASCII letters (a leading space
   allowed). Each is put in an in-context prompt: 10 other words as ``"<w> has the first
   letter: <W>"`` lines, then ``"<word> has the first letter:"``; the activation is read at the
   word's token at the SAE's input site. Words are split 80/20 into train and test.
2. **Ground-truth probe**: a 26-way one-vs-rest logistic probe on the model's activations
   (BCE with positive weights n_neg/n_pos, Adam). A letter takes part only if its probe's
   test F1 exceeds 0.6 (``min_GT_probe_f1``).
3. **Main features** (feature splitting): an L1-regularised 26-way probe on the SAE's features
   ranks the features of each letter (largest weight); for k = 1..10 a balanced logistic
   regression on the top k is scored by test F1, and the main features are the top k of the
   last k whose F1 rose by more than 0.03 over the best so far.
4. **Per test word** whose letter's probe fires (score > 0), with the probe direction p
   (unit), the SAE features f (model units) and cos_i = cos(p, d_i) of each decoder row:
   a = <x, p> the activation's projection; main = sum over main features of f_i cos_i;
   absorbers = the at most 3 largest f_i cos_i > 0 among other features with cos_i >= 0.1.
   **Absorption fraction** = 0 if main >= a or sum(absorbers) / a < 0.4; 1 if main <= 0;
   else min(sum(absorbers), a - main) / (that + main), clipped to [0, 1].
   **Full absorption**: every main feature is zero, the feature with the largest f_i cos_i
   has cos >= 0.025, a >= 0, and that feature's f_i cos_i / a >= 0.4.
5. Per letter: the sums over its words divided by the number of words whose probe fired;
   the score is the mean over the letters kept in step 2 (``mean_absorption_fraction_score``,
   ``mean_full_absorption_score``, ``mean_num_split_features``).

Differences: the probes are trained by this module (same losses and settings, a full-batch
schedule of its own), not loaded from SAEBench's cache; the prompts' ICL examples are drawn
once with the base seed and reused for every reseed (so the model runs over them once; the
reseeds redraw the train/test split and retrain the three probes).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llamascope_sdk.benchmark.spread import Spread, spread
from llamascope_sdk.loading.sae import SAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
N_ICL = 10
MIN_PROBE_F1 = 0.6
F1_JUMP = 0.03
MAX_K = 10
FULL_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
EPS = 1e-8


# ------------------------------------------------------------------- words and prompts
def alpha_words(tokenizer: Any) -> list[str]:
    """Single tokens made of ASCII letters (one leading space allowed), as decoded strings."""
    out: set[str] = set()
    for i in range(int(getattr(tokenizer, "vocab_size", 0) or len(tokenizer))):
        w = tokenizer.decode([i])
        core = w[1:] if w.startswith(" ") else w
        if core and core.isascii() and core.isalpha():
            out.add(w)
    return sorted(out)


def first_letter(word: str) -> str:
    return next(c for c in word if c.isalpha()).lower()


def prompt(word: str, examples: Sequence[str]) -> str:
    lines = [TEMPLATE.format(word=e) + " " + first_letter(e).upper() for e in examples]
    return "\n" + "\n".join([*lines, TEMPLATE.format(word=word)])


def prompts_for(words: Sequence[str], seed: int) -> list[str]:
    """One ICL prompt per word, the examples drawn with ``random.Random(seed)``."""
    rng = random.Random(seed)
    out = []
    for w in words:
        ex = rng.sample(list(words), N_ICL + 1)
        out.append(prompt(w, [e for e in ex if e != w][:N_ICL]))
    return out


def suffix_tokens(encode: Any, words: Sequence[str]) -> tuple[int, list[int]]:
    """The number of tokens after the word (constant for the kept words) and the indices of
    the words whose prompt puts the word on exactly one token at that offset."""
    suffix = TEMPLATE.format(word="")
    counts = []
    for w in words:
        full, head = encode(prompt(w, [])), encode(prompt(w, []).removesuffix(suffix))
        counts.append((len(full) - len(head), full[:len(head)] == head))
    n = max(set(c for c, _ in counts), key=[c for c, _ in counts].count)
    return n, [i for i, (c, ok) in enumerate(counts) if ok and c == n]


# ------------------------------------------------------------------- probes
def train_probe(x_NI: torch.Tensor, y_NC: torch.Tensor, *, seed: int, epochs: int = 100,
                l1: float = 0.0, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic probes (BCE, pos_weight n_neg/n_pos, Adam 0.01 decaying to 1e-5,
    weight decay 1e-6, optional L1 on the weights): returns (W [C, I], b [C])."""
    g = torch.Generator().manual_seed(seed)
    n, d = x_NI.shape
    W = torch.zeros(y_NC.shape[1], d, requires_grad=True)
    b = torch.zeros(y_NC.shape[1], requires_grad=True)
    pos = y_NC.sum(0).clamp(min=1)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(n - pos) / pos)
    opt = torch.optim.Adam([W, b], lr=0.01, weight_decay=1e-6)
    steps = epochs * math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=(1e-5 / 0.01) ** (1 / max(1, steps)))
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(n, generator=g).split(batch):
                loss = loss_fn(x_NI[idx] @ W.T + b, y_NC[idx].float())
                if l1:
                    loss = loss + l1 * W.abs().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return W.detach(), b.detach()


def f1(y: torch.Tensor, pred: torch.Tensor) -> float:
    tp = float((y & pred).sum())
    fp, fn = float((~y & pred).sum()), float((y & ~pred).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def split_features(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor,
                   y_test: torch.Tensor, ranked: torch.Tensor, *, seed: int) -> list[int]:
    """Step 3 for one letter: the main features by the F1-jump rule."""
    best, chosen = -100.0, []
    for k in range(1, MAX_K + 1):
        ids = ranked[:k]
        w, b = train_probe(f_train[:, ids], y_train[:, None], seed=seed, epochs=50,
                           batch=f_train.shape[0])
        score = f1(y_test.bool(), (f_test[:, ids] @ w[0] + b[0]) > 0)
        if score <= best + F1_JUMP:
            break
        best, chosen = score, [int(i) for i in ids]
    return chosen


# ------------------------------------------------------------------- the metric
@dataclass(frozen=True)
class WordScore:
    absorption_fraction: float
    full_absorption: bool


def word_score(f_F: torch.Tensor, a: float, cos_F: torch.Tensor, main: Sequence[int]) -> WordScore:
    """Step 4 for one word: f_F its SAE features, a = <x, p>, cos_F = cos(p, d_i)."""
    proj = f_F.float() * cos_F
    main_idx = torch.tensor(list(main), dtype=torch.long)
    main_proj = float(proj[main_idx].sum()) if len(main) else 0.0
    mask = torch.ones_like(proj, dtype=torch.bool)
    mask[main_idx] = False
    cand = proj[mask & (cos_F >= FRACTION_COS) & (proj > 0)]
    absorbed = float(cand.topk(min(MAX_ABSORBERS, cand.numel())).values.sum())
    if main_proj >= a or absorbed / a < PROJECTION_SHARE:
        frac = 0.0
    elif main_proj <= 0:
        frac = 1.0
    else:
        part = min(absorbed, a - main_proj)
        frac = min(1.0, max(0.0, part / (part + main_proj)))
    top = int(proj.argmax())
    full = (all(float(f_F[i]) < EPS for i in main) and float(cos_F[top]) >= FULL_COS
            and a >= 0 and float(proj[top]) / a >= PROJECTION_SHARE)
    return WordScore(frac, full)


@dataclass
class LetterResult:
    letter: str
    probe_f1: float
    split_features: list[int]
    n_probe_true_positives: int
    mean_absorption_fraction: float
    full_absorption_rate: float
    num_full_absorption: int


def letter_result(letter: str, sae: SAE, x_ND: torch.Tensor, probe_dir_D: torch.Tensor,
                  main: Sequence[int], probe_f1: float) -> LetterResult:
    """Steps 4-5 for one letter over the test words whose probe fired (``x_ND``)."""
    p = probe_dir_D.float() / probe_dir_D.float().norm()
    cos = F.cosine_similarity(p[None, :].to(sae.W_dec.device), sae.W_dec.float(), dim=-1).cpu()
    feats = sae.encode(x_ND.to(sae.device, sae.dtype)).float().cpu()
    a = x_ND.float() @ p
    scores = [word_score(feats[i], float(a[i]), cos, main) for i in range(x_ND.shape[0])]
    n = len(scores)
    n_full = sum(s.full_absorption for s in scores)
    return LetterResult(letter, probe_f1, list(main), n,
                        sum(s.absorption_fraction for s in scores) / n if n else 0.0,
                        n_full / n if n else 0.0, n_full)


@dataclass
class AbsorptionResult:
    """One SAE: per seed, the letters kept; the three scores as spreads over the seeds."""

    mean_absorption_fraction_score: Spread
    mean_full_absorption_score: Spread
    mean_num_split_features: Spread
    letters: list[list[LetterResult]] = field(default_factory=list)
    n_words: int = 0


def aggregate(letters: Sequence[LetterResult]) -> tuple[float, float, float]:
    """Step 5: the means over the letters whose probe F1 passed the gate."""
    kept = [r for r in letters if r.probe_f1 > MIN_PROBE_F1]
    if not kept:
        return math.nan, math.nan, math.nan
    m = len(kept)
    return (sum(r.mean_absorption_fraction for r in kept) / m,
            sum(r.full_absorption_rate for r in kept) / m,
            sum(len(r.split_features) for r in kept) / m)


def one_seed(sae: SAE, x_ND: torch.Tensor, labels: torch.Tensor, seed: int,
             probes: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
             ) -> list[LetterResult]:
    """Steps 2-5 for one seed: split, the three probes, and every letter's result.
    ``probes`` keeps the ground-truth probe per seed (it does not depend on the SAE)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x_ND.shape[0], generator=g)
    n_test = max(1, x_ND.shape[0] // 5)
    te, tr = order[:n_test], order[n_test:]
    y = F.one_hot(labels, len(LETTERS))
    if probes is not None and seed in probes:
        W, b = probes[seed]
    else:
        W, b = train_probe(x_ND[tr].float(), y[tr], seed=seed)
        if probes is not None:
            probes[seed] = (W, b)
    f_all = sae.encode(x_ND.to(sae.device, sae.dtype)).float().cpu()
    W1, _ = train_probe(f_all[tr], y[tr], seed=seed, epochs=50, l1=0.01)
    scores = x_ND.float() @ W.T + b
    out = []
    for c, letter in enumerate(LETTERS):
        yc = labels == c
        if int(yc[tr].sum()) == 0 or int(yc[te].sum()) == 0:
            continue
        probe_f1 = f1(yc[te], scores[te, c] > 0)
        main = split_features(f_all[tr], yc[tr].float(), f_all[te], yc[te],
                              W1[c].topk(MAX_K).indices, seed=seed)
        fired = te[(yc[te]) & (scores[te, c] > 0)]
        out.append(letter_result(letter, sae, x_ND[fired], W[c], main, probe_f1))
    return out


def absorption(sae: SAE, x_ND: torch.Tensor, words: Sequence[str], *, seeds: Sequence[int],
               probes: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
               ) -> AbsorptionResult:
    """The metric of one SAE from the word activations ``x_ND`` (one row per word, read at its
    token in its prompt at the SAE's input site), over ``seeds``; ``probes``: the ground-truth
    probes by seed, shared by the SAEs at one hook point (filled when missing)."""
    labels = torch.tensor([LETTERS.index(first_letter(w)) for w in words])
    per = [one_seed(sae, x_ND, labels, s, probes) for s in seeds]
    agg = [aggregate(p) for p in per]
    return AbsorptionResult(spread([a[0] for a in agg]), spread([a[1] for a in agg]),
                            spread([a[2] for a in agg]), per, len(words))


__all__ = ["LETTERS", "MIN_PROBE_F1", "TEMPLATE", "AbsorptionResult", "LetterResult",
           "WordScore", "absorption", "aggregate", "alpha_words", "first_letter",
           "letter_result", "one_seed", "prompt", "prompts_for", "split_features",
           "suffix_tokens", "train_probe", "word_score"]
