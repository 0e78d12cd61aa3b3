"""Losses against hand-written loop formulas (float64), the Circle Loss paper's properties, numerics, training."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from retrieval.errors import RetrievalError
from retrieval.losses import (
    LOSS_DEFAULTS,
    LOSS_HELP,
    LOSSES,
    CircleLoss,
    ClassCircleLoss,
    ContrastiveLoss,
    TripletLoss,
    make_loss,
)

LABEL_PATTERNS = {
    "all-distinct": [0, 1, 2, 3, 4],
    "all-equal": [3, 3, 3, 3, 3, 3],
    "pairs": [0, 0, 1, 1, 2, 2, 3, 3],
    "singletons": [0, 0, 0, 1, 2, 3, 3, 4],
    "imbalanced": [1, 1, 1, 1, 1, 1, 0, 0, 2],
}
NUM_CLASSES = 5  # every pattern's labels lie below this


# ---------------------------------------------------------------- reference formulas: plain loops, float64


def _lse(terms):
    """log(sum(exp(t))) by hand, shifted by the largest term."""
    top = max(t.item() for t in terms)
    return top + torch.log(sum(torch.exp(t - top) for t in terms))


def _softplus(z):
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-torch.abs(z)))


def _circle_anchor(sims_pos, sims_neg, m, gamma):
    """One anchor's circle loss from lists of scalar similarities."""
    pos_terms = [-gamma * torch.clamp(1 + m - s.detach(), min=0) * (s - (1 - m)) for s in sims_pos]
    neg_terms = [gamma * torch.clamp(s.detach() + m, min=0) * (s - m) for s in sims_neg]
    return _softplus(_lse(neg_terms) + _lse(pos_terms))


def _pairs(x, labels, i):
    pos = [torch.dot(x[i], x[j]) for j in range(len(labels)) if j != i and labels[j] == labels[i]]
    neg = [torch.dot(x[i], x[j]) for j in range(len(labels)) if labels[j] != labels[i]]
    return pos, neg


def _mean_over_anchors(x, labels, anchor_loss):
    losses = []
    for i in range(len(labels)):
        pos, neg = _pairs(x, labels, i)
        if pos and neg:
            losses.append(anchor_loss(pos, neg))
    return sum(losses) / len(losses) if losses else (x * 0).sum()


def ref_circle(x, labels, m, gamma):
    return _mean_over_anchors(x, labels, lambda pos, neg: _circle_anchor(pos, neg, m, gamma))


def ref_class_circle(x, labels, proxies, m, gamma):
    w = [p / torch.sqrt(torch.dot(p, p)) for p in proxies]
    losses = []
    for i, y in enumerate(labels):
        sims = [torch.dot(x[i], w[c]) for c in range(len(w))]
        losses.append(_circle_anchor([sims[y]], [s for c, s in enumerate(sims) if c != y], m, gamma))
    return sum(losses) / len(losses)


def ref_triplet(x, labels, margin, mining):
    def anchor(pos, neg):
        if mining == "batch-hard":
            return torch.clamp(max(neg, key=torch.Tensor.item) - min(pos, key=torch.Tensor.item) + margin, min=0)
        if mining == "all":
            return sum(torch.clamp(n - p + margin, min=0) for p in pos for n in neg) / (len(pos) * len(neg))
        per_positive = []
        for p in pos:
            farther = [n for n in neg if n.item() < p.item()]
            chosen = max(farther, key=torch.Tensor.item) if farther else min(neg, key=torch.Tensor.item)
            per_positive.append(torch.clamp(chosen - p + margin, min=0))
        return sum(per_positive) / len(per_positive)

    return _mean_over_anchors(x, labels, anchor)


def ref_contrastive(x, labels, pos_margin, neg_margin):
    def anchor(pos, neg):
        pull = sum(torch.clamp(pos_margin - s, min=0) for s in pos)
        return pull + sum(torch.clamp(s - neg_margin, min=0) for s in neg)

    return _mean_over_anchors(x, labels, anchor)


CASES = {
    "circle": (lambda: CircleLoss(), lambda x, y, loss: ref_circle(x, y, 0.4, 80.0)),
    "circle-m0.25-g256": (lambda: CircleLoss(m=0.25, gamma=256), lambda x, y, loss: ref_circle(x, y, 0.25, 256.0)),
    "class-circle": (
        lambda: ClassCircleLoss(NUM_CLASSES, 6),
        lambda x, y, loss: ref_class_circle(x, y, loss.proxies.detach().double().requires_grad_(), 0.25, 256.0),
    ),
    "triplet-batch-hard": (lambda: TripletLoss(), lambda x, y, loss: ref_triplet(x, y, 0.1, "batch-hard")),
    "triplet-semi-hard": (
        lambda: TripletLoss(margin=0.3, mining="semi-hard"),
        lambda x, y, loss: ref_triplet(x, y, 0.3, "semi-hard"),
    ),
    "triplet-all": (lambda: TripletLoss(margin=0.3, mining="all"), lambda x, y, loss: ref_triplet(x, y, 0.3, "all")),
    "contrastive": (lambda: ContrastiveLoss(), lambda x, y, loss: ref_contrastive(x, y, 1.0, 0.5)),
}


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).float()


@pytest.mark.parametrize("pattern", LABEL_PATTERNS)
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_match_loop_formula(case, pattern):
    build, reference = CASES[case]
    torch.manual_seed(0)
    loss_fn = build()
    labels = LABEL_PATTERNS[pattern]
    x32 = _unit(len(labels), 6, seed=len(case) * 31 + len(pattern)).requires_grad_()
    x64 = x32.detach().double().requires_grad_()

    got = loss_fn(x32, torch.tensor(labels))
    want = reference(x64, labels, loss_fn)
    got.backward()
    want.backward()

    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    scale = max(float(x64.grad.abs().max()), 1.0)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5 * scale)
    if pattern in ("all-distinct", "all-equal") and case != "class-circle":
        assert got.item() == 0.0  # no anchor has both a positive and a negative
    else:
        assert got.item() > 0.0  # the case really exercises the formula


def test_class_circle_proxy_gradient_matches_loop_formula():
    torch.manual_seed(1)
    loss_fn = ClassCircleLoss(NUM_CLASSES, 6, m=0.25, gamma=64)
    labels = LABEL_PATTERNS["imbalanced"]
    x = _unit(len(labels), 6, seed=5)
    proxies64 = loss_fn.proxies.detach().double().requires_grad_()
    loss_fn(x, torch.tensor(labels)).backward()
    ref_class_circle(x.double(), labels, proxies64, 0.25, 64.0).backward()
    torch.testing.assert_close(loss_fn.proxies.grad.double(), proxies64.grad, rtol=1e-4, atol=1e-6)


def test_class_circle_is_softmax_cross_entropy_over_circle_logits():
    torch.manual_seed(2)
    m, gamma = 0.25, 256.0
    loss_fn = ClassCircleLoss(4, 8, m=m, gamma=gamma)
    x, labels = _unit(10, 8, seed=3), torch.randint(0, 4, (10,))
    s = (x @ F.normalize(loss_fn.proxies.detach(), dim=1).T).double()
    own = F.one_hot(labels, 4).bool()
    target_logit = -gamma * (1 + m - s).clamp_min(0) * (s - (1 - m))  # as a positive; the sign flips below
    other_logit = gamma * (s + m).clamp_min(0) * (s - m)
    logits = torch.where(own, -target_logit, other_logit)
    torch.testing.assert_close(loss_fn(x, labels).double(), F.cross_entropy(logits, labels), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the paper's properties (on similarities)


def _one_anchor(s_pos, s_neg):
    """A similarity matrix whose row 0 is an anchor with the given positive and negative similarities."""
    n = 1 + len(s_pos) + len(s_neg)
    sim = torch.zeros(n, n)
    sim[0, 1:] = torch.tensor(list(s_pos) + list(s_neg))
    pos = torch.zeros(n, n, dtype=torch.bool)
    neg = torch.zeros(n, n, dtype=torch.bool)
    pos[0, 1 : 1 + len(s_pos)] = True
    neg[0, 1 + len(s_pos) :] = True
    return sim.requires_grad_(), pos, neg


def _loss_at(loss_fn, s_pos, s_neg):
    return loss_fn.loss_from_similarities(*_one_anchor(s_pos, s_neg)).item()


def test_circle_loss_decreases_as_sp_rises_and_sn_falls():
    loss_fn = CircleLoss()
    sweep = torch.linspace(-1, 1, 41).tolist()
    along_sp = [_loss_at(loss_fn, [s], [0.3]) for s in sweep]
    assert all(a > b for a, b in zip(along_sp, along_sp[1:], strict=False))
    # The value's slope in s_n is gamma * a_n * 2 s_n (weights included), positive for s_n > 0 ...
    along_sn = [_loss_at(loss_fn, [0.5], [s]) for s in torch.linspace(0, 1, 21).tolist()]
    assert all(a < b for a, b in zip(along_sn, along_sn[1:], strict=False))
    # ... while the optimisation direction (weights detached) always raises s_p and lowers s_n.
    for s_p, s_n in [(-0.9, -0.3), (0.0, -0.2), (0.5, 0.1), (0.95, 0.9), (0.2, 0.6)]:
        sim, pos, neg = _one_anchor([s_p], [s_n])
        loss_fn.loss_from_similarities(sim, pos, neg).backward()
        assert sim.grad[0, 1] < 0 < sim.grad[0, 2]


def test_zero_weight_regions_give_zero_gradient_to_that_pair():
    loss_fn = CircleLoss(m=0.4, gamma=80)
    # s_p >= 1 + m and s_n <= -m sit at their optima (reachable for s_n; s_p only on the similarity level).
    sim, pos, neg = _one_anchor([1.45, 1.5, 0.6], [-0.45, -0.7, 0.2])
    loss_fn.loss_from_similarities(sim, pos, neg).backward()
    grad = sim.grad[0, 1:]
    assert grad[0] == 0 and grad[1] == 0 and grad[3] == 0 and grad[4] == 0
    assert grad[2] < 0 < grad[5]


def test_larger_gamma_approaches_the_hardest_pair():
    s_pos, s_neg = [0.2, 0.5, 0.7], [0.35, 0.1, -0.1, 0.3]
    m = 0.25
    hardest_p = max((1 + m - s) * (1 - m - s) for s in s_pos)  # max of -a_p (s_p - D_p)
    hardest_n = max((s + m) * (s - m) for s in s_neg)
    limit = max(hardest_p + hardest_n, 0.0)
    gaps, shares = [], []
    for gamma in (16, 64, 256, 1024):
        loss_fn = CircleLoss(m=m, gamma=gamma)
        sim, pos, neg = _one_anchor(s_pos, s_neg)
        value = loss_fn.loss_from_similarities(sim, pos, neg)
        value.backward()
        gap = value.item() / gamma - limit
        assert -1e-6 <= gap <= (math.log(len(s_pos)) + math.log(len(s_neg)) + math.log(2)) / gamma + 1e-6
        gaps.append(gap)
        g_neg = sim.grad[0, 1 + len(s_pos) :].abs()
        shares.append(float(g_neg[0] / g_neg.sum()))  # s_n = 0.35 is the hardest negative
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False))
    assert all(a < b for a, b in zip(shares, shares[1:], strict=False)) and shares[-1] > 0.999


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("gamma", [256, 1024])
@pytest.mark.parametrize("layout", ["identical", "antipodal"])
@pytest.mark.parametrize("kind", ["circle", "class-circle"])
def test_large_gamma_stays_finite(kind, layout, gamma):
    v = F.normalize(torch.ones(8), dim=0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    signs = torch.ones(6) if layout == "identical" else torch.tensor([1.0, -1, 1, -1, 1, -1])
    x = (signs[:, None] * v).requires_grad_()
    loss_fn = make_loss(kind, num_classes=3, dim=8, m=0.25, gamma=gamma)
    if kind == "class-circle":
        with torch.no_grad():
            loss_fn.proxies.copy_(v.expand(3, 8) * torch.tensor([[1.0], [-1.0], [1.0]]))
    value = loss_fn(x, labels)
    value.backward()
    params = [x] + list(loss_fn.parameters())
    assert torch.isfinite(value) and value.item() > 0
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("case", [c for c in CASES if c != "class-circle"])
@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 4], [2, 2, 2, 2]], ids=["no-positive", "no-negative"])
def test_batch_without_pairs_gives_zero_with_working_backward(case, labels):
    x = _unit(len(labels), 4, seed=9).requires_grad_()
    value = CASES[case][0]()(x, torch.tensor(labels))
    value.backward()
    assert value.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", LOSSES)
def test_half_precision_and_autocast_compute_in_float32(name):
    torch.manual_seed(3)
    loss_fn = make_loss(name, num_classes=NUM_CLASSES, dim=6)
    labels = torch.tensor(LABEL_PATTERNS["pairs"])
    x = _unit(len(labels), 6, seed=4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(x, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loss_fn(x.float(), labels), rtol=0, atol=0)


# ---------------------------------------------------------------- factory


def test_factory_builds_every_loss_with_the_paper_defaults():
    assert LOSSES == ("circle", "class-circle", "triplet", "contrastive")
    assert LOSS_DEFAULTS["circle"] == {"m": 0.4, "gamma": 80.0}
    assert LOSS_DEFAULTS["class-circle"] == {"m": 0.25, "gamma": 256.0}
    assert LOSS_DEFAULTS["triplet"] == {"margin": 0.1, "mining": "batch-hard"}
    assert LOSS_DEFAULTS["contrastive"] == {"pos_margin": 1.0, "neg_margin": 0.5}
    assert set(LOSS_HELP) == set(LOSSES) and all(LOSS_HELP.values())
    for name in LOSSES:
        loss_fn = make_loss(name, num_classes=4, dim=3)
        assert {k: getattr(loss_fn, k) for k in LOSS_DEFAULTS[name]} == LOSS_DEFAULTS[name]
    assert make_loss("circle", gamma=32, m=0.1).gamma == 32
    assert make_loss("triplet", mining="semi-hard").mining == "semi-hard"
    assert list(make_loss("class-circle", num_classes=7, dim=5).parameters())[0].shape == (7, 5)
    assert not list(make_loss("circle", num_classes=7, dim=5).parameters())


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("arcface", {}, "choose one of circle, class-circle"),
        ("circle", {"margin": 0.2}, "has no parameter margin; it takes m (default 0.4), gamma (default 80.0)"),
        ("class-circle", {}, "needs num_classes and dim"),
        ("circle", {"m": 0.5}, "0 <= m < 0.5"),
        ("circle", {"gamma": 0}, "gamma > 0"),
        ("triplet", {"mining": "hardest"}, "batch-hard, semi-hard, all"),
        ("contrastive", {"pos_margin": 0.3, "neg_margin": 0.5}, "neg_margin < pos_margin"),
    ],
)
def test_factory_rejects_bad_settings_with_a_fix(name, kwargs, message):
    with pytest.raises(RetrievalError, match=re.escape(message)):
        make_loss(name, **kwargs)


def test_class_circle_rejects_labels_outside_its_classes():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ClassCircleLoss(3, 4)(_unit(2, 4, seed=0), torch.tensor([0, 3]))


# ---------------------------------------------------------------- a tiny training run


def _recall_at_1(embeddings, labels):
    """Brute force: is each sample's nearest other sample (cosine) of its class?"""
    hits = 0
    for i in range(len(labels)):
        best = max((j for j in range(len(labels)) if j != i), key=lambda j: (embeddings[i] @ embeddings[j]).item())
        hits += int(labels[best] == labels[i])
    return hits / len(labels)


def _clusters(n_per_class, seed):
    """Five Gaussian classes separated in 4 feature dims, hidden under 12 dims of louder nuisance."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)) * 1.5
    labels = torch.arange(5).repeat_interleave(n_per_class)
    signal = centres[labels] + 0.3 * torch.randn(len(labels), 4, generator=g)
    nuisance = 3.0 * torch.randn(len(labels), 12, generator=g)
    return torch.cat([signal, nuisance], dim=1), labels


@pytest.mark.parametrize("case", CASES)
def test_training_lowers_the_loss_and_raises_recall(case):
    torch.manual_seed(0)
    train_x, train_y = _clusters(20, seed=1)
    test_x, test_y = _clusters(8, seed=2)
    model = torch.nn.Linear(16, 6)
    loss_fn = CASES[case][0]()
    optimiser = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=0.02)

    def embed(x):
        return F.normalize(model(x), dim=1)

    with torch.no_grad():
        recall_before = _recall_at_1(embed(test_x), test_y)
        loss_before = float(loss_fn(embed(train_x), train_y))
    for _ in range(150):
        optimiser.zero_grad()
        loss_fn(embed(train_x), train_y).backward()
        optimiser.step()
    with torch.no_grad():
        recall_after = _recall_at_1(embed(test_x), test_y)
        loss_after = float(loss_fn(embed(train_x), train_y))

    assert loss_after < 0.5 * loss_before
    assert recall_before < 0.5 and recall_after >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", LOSSES)
def test_cuda_under_float16_autocast_matches_cpu(name):
    torch.manual_seed(6)
    loss_fn = make_loss(name, num_classes=NUM_CLASSES, dim=6)
    labels = torch.tensor(LABEL_PATTERNS["imbalanced"])
    x = _unit(len(labels), 6, seed=7).half()
    want = loss_fn(x.float(), labels)
    with torch.autocast("cuda", dtype=torch.float16):
        got = loss_fn.cuda()(x.cuda(), labels.cuda())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
