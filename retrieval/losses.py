"""Metric-learning losses: Circle Loss (pair-wise and class-level) with triplet and contrastive baselines.

Every loss takes L2-normalised embeddings ``(N, D)`` and integer labels ``(N,)`` and returns a scalar. The
loss is computed in float32 whatever the input dtype, with autocast switched off, because ``gamma`` up to
1024 multiplies similarities and half precision would lose the margins.

The shared work (similarities, positive/negative masks, reduction) lives once in :class:`MetricLoss`, the
template-method layout of pytorch-metric-learning's ``GenericPairLoss``: each loss writes only
:meth:`MetricLoss.anchor_losses`, its per-anchor formula on the similarity matrix. Row ``i`` of that
matrix is anchor ``i``; its positives are the *other* samples of its class (for class-level losses: its
class proxy), its negatives every sample (proxy) of another class. The batch loss is the mean over the
anchors that have at least one positive and one negative; when none has, it is 0 and still
back-propagates (zero gradients, no NaN).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retrieval.errors import RetrievalError

TRIPLET_MINING = ("batch-hard", "semi-hard", "all")


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """``log(sum(exp(x)))`` over the entries where ``mask`` is True; ``-inf`` on rows with none.

    Max-shifted, so any magnitude is finite, and free of NaN in backward even on all-masked rows
    (their entries get exactly zero gradient), so callers may compute every row and select later.
    """
    x = x.masked_fill(~mask, float("-inf"))
    kept = mask.any(dim, keepdim=True)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    shift = torch.where(kept, x.amax(dim, keepdim=True), zero).detach()
    total = (x - shift).exp().sum(dim, keepdim=True)
    lse = total.clamp_min(torch.finfo(x.dtype).tiny).log() + shift
    return torch.where(kept, lse, float("-inf")).squeeze(dim)


def _masked_mean(values: Tensor, mask: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean of ``values`` where ``mask`` holds, over ``dims``; 0 where nothing is kept (never NaN)."""
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dims)
    return total / mask.sum(dims).clamp_min(1)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RetrievalError(message)


class MetricLoss(nn.Module):
    """Template: float32 similarities and masks -> per-anchor losses -> mean over qualifying anchors."""

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
            raise ValueError(
                f"expected embeddings (N, D) and labels (N,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            sim, pos, neg = self.similarities(embeddings.float(), labels.to(embeddings.device))
            return self.loss_from_similarities(sim, pos, neg)

    def similarities(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine similarities within the batch, with positive and negative masks (anchor excluded)."""
        same = labels[:, None] == labels[None, :]
        itself = torch.eye(len(labels), dtype=torch.bool, device=x.device)
        return x @ x.T, same & ~itself, ~same

    def loss_from_similarities(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """Mean of :meth:`anchor_losses` over rows with a positive and a negative (0 when there is none)."""
        return _masked_mean(self.anchor_losses(sim, pos, neg), pos.any(1) & neg.any(1), (0,))

    def anchor_losses(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """Loss of each anchor (row) as a ``(N,)`` tensor; rows without pairs may hold anything finite or inf."""
        raise NotImplementedError


class CircleLoss(MetricLoss):
    """Circle Loss, pair-wise labels (Sun et al. 2020, eq. 6): self-paced weights on every pair in the batch.

    ``L_i = softplus(logsumexp_j[gamma a_n (s_n - m)] + logsumexp_k[-gamma a_p (s_p - 1 + m)])`` with
    ``a_p = relu(1 + m - s_p)`` and ``a_n = relu(s_n + m)`` detached: pairs far from their optimum get
    larger weights, pairs at it (``s_p >= 1 + m``, ``s_n <= -m``) get none. ``m`` relaxes the decision
    margins (valid in ``[0, 0.5)`` so the positive margin ``1 - m`` stays above the negative one ``m``);
    ``gamma`` is the scale: larger values focus the loss on the hardest pairs.
    """

    def __init__(self, m: float = 0.4, gamma: float = 80.0):
        super().__init__()
        _require(0.0 <= m < 0.5, f"circle loss needs 0 <= m < 0.5 (margins 1-m and m must not cross), got m={m}")
        _require(gamma > 0, f"circle loss needs gamma > 0, got gamma={gamma}")
        self.m = float(m)
        self.gamma = float(gamma)

    def anchor_losses(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        a_p = (1 + self.m - sim).clamp_min(0).detach()
        a_n = (sim + self.m).clamp_min(0).detach()
        logit_p = -self.gamma * a_p * (sim - (1 - self.m))
        logit_n = self.gamma * a_n * (sim - self.m)
        return F.softplus(masked_logsumexp(logit_n, neg) + masked_logsumexp(logit_p, pos))

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}"


class ClassCircleLoss(CircleLoss):
    """Circle Loss, class-level labels: learnable class proxies, i.e. softmax cross-entropy with circle logits.

    Each sample is compared with the normalised proxy of every class (``s_p`` its own, ``s_n`` the others)
    under the same weights and margins as :class:`CircleLoss`. The proxies are parameters of this module:
    add them to the optimiser and move the module to the model's device.
    """

    def __init__(self, num_classes: int, dim: int, m: float = 0.25, gamma: float = 256.0):
        super().__init__(m=m, gamma=gamma)
        _require(num_classes >= 2, f"class-circle loss needs at least 2 classes, got num_classes={num_classes}")
        _require(dim >= 1, f"class-circle loss needs dim >= 1, got dim={dim}")
        self.num_classes = int(num_classes)
        self.proxies = nn.Parameter(torch.randn(self.num_classes, int(dim)))

    def similarities(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cosine similarity of each sample to each class proxy; its own class is the one positive."""
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        own = labels[:, None] == torch.arange(self.num_classes, device=x.device)[None, :]
        return x @ F.normalize(self.proxies.float(), dim=1).T, own, ~own

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.proxies.shape[1]}, {super().extra_repr()}"


class TripletLoss(MetricLoss):
    """Triplet loss on cosine similarity, relu(s_an - s_ap + margin), with batch-hard, semi-hard or all mining.

    On unit vectors ``d^2 = 2 - 2s``, so ``margin=0.1`` equals FaceNet's squared-distance margin 0.2
    (up to a factor 2 in the loss). Mining: ``batch-hard`` (Hermans et al. 2017) takes each anchor's
    least similar positive and most similar negative; ``semi-hard`` (Schroff et al. 2015, as in
    TensorFlow Addons) takes, for each positive, the most similar negative that is still less similar than
    it, or the least similar negative when none is, and averages over the positives; ``all`` averages every
    (positive, negative) triplet. ``semi-hard`` and ``all`` use ``O(N^3)`` memory.
    """

    def __init__(self, margin: float = 0.1, mining: str = "batch-hard"):
        super().__init__()
        _require(margin >= 0, f"triplet loss needs margin >= 0, got margin={margin}")
        _require(
            mining in TRIPLET_MINING,
            f"unknown triplet mining {mining!r}; choose one of {', '.join(TRIPLET_MINING)}",
        )
        self.margin = float(margin)
        self.mining = mining

    def anchor_losses(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        if self.mining == "batch-hard":
            hardest_pos = sim.masked_fill(~pos, float("inf")).amin(1)
            hardest_neg = sim.masked_fill(~neg, float("-inf")).amax(1)
            return F.relu(hardest_neg - hardest_pos + self.margin)
        s_ap, s_an = sim[:, :, None], sim[:, None, :]  # indexed [anchor, positive, negative]
        if self.mining == "all":
            triplets = pos[:, :, None] & neg[:, None, :]
            return _masked_mean(F.relu(s_an - s_ap + self.margin), triplets, (1, 2))
        farther = neg[:, None, :] & (s_an < s_ap)
        semi_hard = s_an.masked_fill(~farther, float("-inf")).amax(2)
        easiest = sim.masked_fill(~neg, float("inf")).amin(1, keepdim=True)
        chosen = torch.where(farther.any(2), semi_hard, easiest)
        return _masked_mean(F.relu(chosen - sim + self.margin), pos, (1,))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}"


class ContrastiveLoss(MetricLoss):
    """Contrastive loss on cosine similarity: pulls positives up to pos_margin, pushes negatives below neg_margin.

    ``L_i = sum_k relu(pos_margin - s_p) + sum_j relu(s_n - neg_margin)``, the contrastive baseline of
    Wang et al. (XBM, CVPR 2020) with defaults 1.0 and 0.5 (a continuous hinge on the negatives).
    """

    def __init__(self, pos_margin: float = 1.0, neg_margin: float = 0.5):
        super().__init__()
        _require(
            neg_margin < pos_margin,
            f"contrastive loss needs neg_margin < pos_margin, got {neg_margin} and {pos_margin}",
        )
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)

    def anchor_losses(self, sim: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
        pull = torch.where(pos, F.relu(self.pos_margin - sim), zero).sum(1)
        push = torch.where(neg, F.relu(sim - self.neg_margin), zero).sum(1)
        return pull + push

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


_LOSS_CLASSES: dict[str, type[MetricLoss]] = {
    "circle": CircleLoss,
    "class-circle": ClassCircleLoss,
    "triplet": TripletLoss,
    "contrastive": ContrastiveLoss,
}
LOSSES = tuple(_LOSS_CLASSES)
# Hyper-parameters and their defaults, read from the constructors so the help text cannot drift from them;
# LOSS_HELP is each class's one-line summary (first docstring line), plain text for CLI help.
LOSS_DEFAULTS: dict[str, dict[str, object]] = {
    name: {p.name: p.default for p in inspect.signature(cls).parameters.values() if p.default is not p.empty}
    for name, cls in _LOSS_CLASSES.items()
}
LOSS_HELP: dict[str, str] = {name: (inspect.getdoc(cls) or name).splitlines()[0] for name, cls in _LOSS_CLASSES.items()}


def make_loss(name: str, *, num_classes: int | None = None, dim: int | None = None, **params: Any) -> MetricLoss:
    """Build loss ``name`` (one of :data:`LOSSES`) with hyper-parameters ``params`` (see :data:`LOSS_DEFAULTS`).

    ``num_classes`` and ``dim`` size the proxies of ``class-circle`` (required there, ignored elsewhere).
    """
    if name not in _LOSS_CLASSES:
        raise RetrievalError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    unknown = sorted(set(params) - set(LOSS_DEFAULTS[name]))
    if unknown:
        accepted = ", ".join(f"{k} (default {v})" for k, v in LOSS_DEFAULTS[name].items())
        raise RetrievalError(f"loss {name!r} has no parameter {', '.join(unknown)}; it takes {accepted}")
    if name == "class-circle":
        if num_classes is None or dim is None:
            raise RetrievalError("loss 'class-circle' needs num_classes and dim to size its learnable class proxies")
        return ClassCircleLoss(num_classes, dim, **params)
    return _LOSS_CLASSES[name](**params)
