"""Ordinal training objectives: heads that map a feature vector to a distribution over K ordered grades 0..K-1,
each with its own training loss, behind a registry (`create_ordinal_head`).

Every head honours one contract: `forward(x_BF)` gives its logits; `probabilities(logits)` a proper distribution
over grades (B, K); `loss(logits, target_BK)` a scalar for a target *distribution* over grades (one-hot, or
smoothed with `smooth_labels` when raters disagree). Registered heads, tag `rank_consistent` saying whether the
cumulative probabilities P(y > k) are non-increasing in k by construction:

- `cross_entropy`: linear logits, softmax, soft-target cross-entropy (the baseline).
- `corn`: CORN (Shi, Cao & Raschka 2021), conditional binary tasks P(y > k | y > k-1).
- `cumulative_link`: proportional odds (McCullagh 1980), one score and K-1 ordered thresholds.
- `qwk`: linear logits, softmax, the differentiable quadratic-weighted-kappa loss (de la Torre, Puig & Valls 2018).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry

ORDINAL_HEADS: Registry = Registry("ordinal head")
# Smallest gap between consecutive cumulative-link thresholds: softplus alone can round to 0 in float32 (an empty
# middle grade drives its gap towards 0), which would tie two thresholds and give a grade probability of exactly 0.
MIN_THRESHOLD_GAP = 1e-3
QWK_DENOMINATOR_FLOOR = 1e-8


def create_ordinal_head(name: str, in_features: int, num_classes: int, **options) -> OrdinalHead:
    """Builds the ordinal head registered as `name` (e.g. `create_ordinal_head("corn", 64, 5)`)."""
    return ORDINAL_HEADS.create(name, in_features=in_features, num_classes=num_classes, **options)


def list_ordinal_heads() -> list[str]:
    return ORDINAL_HEADS.names()


def smooth_labels(grades_B: torch.Tensor, num_classes: int, epsilon: float) -> torch.Tensor:
    """Target distributions (B, K) for uncertain grades: 1 - epsilon on the grade, epsilon split equally between
    the two neighbouring grades (all of it to the one neighbour of grade 0 or K-1). epsilon = 0 gives one-hot.

    A rater who disagrees moves a score by one grade, hence the mass goes to neighbours, not uniformly."""
    if not 0.0 <= float(epsilon) < 1.0:
        raise UserError(f"label smoothing epsilon must be in [0, 1), got epsilon={epsilon}; use 0 for hard labels "
                        "and e.g. 0.1-0.3 for grades raters disagree on")
    grades = torch.as_tensor(grades_B).long().reshape(-1)
    _check_num_classes(num_classes)
    if len(grades) and (grades.min() < 0 or grades.max() >= num_classes):
        raise UserError(f"grades must lie in 0..{num_classes - 1} for num_classes={num_classes}, got values from "
                        f"{int(grades.min())} to {int(grades.max())}: shift the grades to start at 0")
    target = F.one_hot(grades, num_classes).double() * (1.0 - epsilon)
    at_end = (grades == 0) | (grades == num_classes - 1)
    share = torch.where(at_end, float(epsilon), epsilon / 2.0).double()
    rows = torch.arange(len(grades), device=grades.device)
    lower, upper = grades > 0, grades < num_classes - 1
    target[rows[lower], grades[lower] - 1] += share[lower]
    target[rows[upper], grades[upper] + 1] += share[upper]
    return target.float()


def soft_qwk_loss(probabilities_BK: torch.Tensor, target_BK: torch.Tensor) -> torch.Tensor:
    """1 - quadratic weighted kappa with soft counts (de la Torre, Puig & Valls 2018, "Weighted kappa loss function
    for multi-class classification of ordinal data in deep learning").

    O = T^T P (target grade i by predicted grade j), W_ij = (i - j)^2 / (K - 1)^2, E = outer(T.sum(0), P.sum(0)) / B;
    loss = sum(W * O) / sum(W * E). With one-hot P and T it equals 1 - Cohen's quadratic kappa. The ratio form (not
    the paper's log) keeps it in [0, 2]; the denominator is floored so a batch of one grade gives no division by 0.
    """
    _check_target(probabilities_BK.shape, target_BK)
    num_classes = probabilities_BK.shape[1]
    grades = torch.arange(num_classes, dtype=probabilities_BK.dtype, device=probabilities_BK.device)
    weights_KK = (grades[:, None] - grades[None, :]) ** 2 / (num_classes - 1) ** 2
    observed_KK = target_BK.T @ probabilities_BK
    expected_KK = torch.outer(target_BK.sum(0), probabilities_BK.sum(0)) / probabilities_BK.shape[0]
    return (weights_KK * observed_KK).sum() / (weights_KK * expected_KK).sum().clamp_min(QWK_DENOMINATOR_FLOOR)


def median_grade(probabilities_BK) -> torch.Tensor:
    """The smallest grade k whose cumulative probability reaches 0.5 (B,), long: the prediction that minimises the
    expected absolute error in grades."""
    cumulative_BK = torch.as_tensor(probabilities_BK).cumsum(dim=1)
    below_half = (cumulative_BK < 0.5).sum(dim=1)
    return below_half.clamp(max=cumulative_BK.shape[1] - 1).long()  # rounding may leave the last cumsum < 0.5


def expected_grade(probabilities_BK) -> torch.Tensor:
    """The mean grade sum_k k P(k) (B,), float: a continuous score for Spearman or MAE."""
    probabilities = torch.as_tensor(probabilities_BK)
    grades = torch.arange(probabilities.shape[1], dtype=probabilities.dtype, device=probabilities.device)
    return (probabilities * grades).sum(dim=1).float()


def _check_num_classes(num_classes: int) -> None:
    if int(num_classes) < 2:
        raise UserError(f"an ordinal head needs num_classes >= 2 grades, got num_classes={num_classes}; "
                        "set it to the number of grades of the scale (e.g. 5 for grades 0-4)")


def _check_target(expected_shape: tuple[int, ...], target_BK: torch.Tensor) -> None:
    if len(expected_shape) != 2 or tuple(target_BK.shape) != tuple(expected_shape):
        raise UserError(f"the target must be a (B, K) distribution over grades of shape {tuple(expected_shape)}, "
                        f"got shape {tuple(target_BK.shape)}; turn grades into "
                        "targets with smooth_labels(grades, num_classes, epsilon)")


def _soft_cross_entropy(log_probabilities_BK: torch.Tensor, target_BK: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_k T_k log P_k: the negative log-likelihood of the target distribution."""
    _check_target(log_probabilities_BK.shape, target_BK)
    return -(target_BK * log_probabilities_BK).sum(dim=1).mean()


class OrdinalHead(nn.Module):
    """The contract: `forward(x_BF)` -> logits, `probabilities(logits)` -> (B, K), `loss(logits, target_BK)`.

    The base is the baseline: logits (B, K), softmax, soft-target cross-entropy. Subclasses change the
    parametrisation (`forward`), and the loss or the map from logits to grade probabilities.

    Args:
        in_features: F, the feature vector's length.
        num_classes: K, the number of grades 0..K-1.
        bias: whether the linear layer has a bias.
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = True):
        super().__init__()
        _check_num_classes(num_classes)
        if int(in_features) < 1:
            raise UserError(f"an ordinal head needs in_features >= 1, got in_features={in_features}; pass the "
                            "embedding dimension of the features it reads")
        self.num_classes = int(num_classes)
        self.linear = nn.Linear(int(in_features), self.linear_outputs(self.num_classes), bias=bias)

    @staticmethod
    def linear_outputs(num_classes: int) -> int:
        """How many outputs the linear layer has: one logit per grade here."""
        return num_classes

    def forward(self, x_BF: torch.Tensor) -> torch.Tensor:
        return self.linear(x_BF)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """A distribution over grades (B, K): non-negative, each row summing to 1."""
        return logits.softmax(dim=1)

    def loss(self, logits: torch.Tensor, target_BK: torch.Tensor) -> torch.Tensor:
        """Soft-target cross-entropy, averaged over the batch."""
        return _soft_cross_entropy(logits.log_softmax(dim=1), target_BK)


@ORDINAL_HEADS.register("cross_entropy", rank_consistent=False)
class CrossEntropyHead(OrdinalHead):
    """Linear(F, K), softmax, soft-target cross-entropy: the baseline that ignores the grades' order."""


@ORDINAL_HEADS.register("qwk", rank_consistent=False)
class QwkHead(OrdinalHead):
    """Linear(F, K), softmax, trained with `soft_qwk_loss` (1 - soft quadratic weighted kappa): penalises a
    prediction by its squared distance in grades. The loss is a ratio over the batch, so use large batches."""

    def loss(self, logits: torch.Tensor, target_BK: torch.Tensor) -> torch.Tensor:
        return soft_qwk_loss(self.probabilities(logits), target_BK)


@ORDINAL_HEADS.register("corn", rank_consistent=True)
class CornHead(OrdinalHead):
    """CORN (Shi, Cao & Raschka 2021, "Deep neural networks for rank-consistent ordinal regression based on
    conditional probabilities"): Linear(F, K-1) gives conditional logits l_k for P(y > k | y > k-1), so
    P(y > k) = prod_{j <= k} sigmoid(l_j) is non-increasing in k by construction.

    The loss is the paper's: binary cross-entropy of task k on the samples with y > k-1, summed over tasks and
    divided by the total size of the task subsets. A soft target weights sample i in task k by T(y_i > k-1) with
    binary target T(y > k | y > k-1), i.e. -sum_ik [T(y_i > k) log s(l_ik) + T(y_i = k) log(1 - s(l_ik))] /
    sum_ik T(y_i > k-1); for one-hot targets this is exactly the paper's loss.
    """

    @staticmethod
    def linear_outputs(num_classes: int) -> int:
        return num_classes - 1

    def exceedance_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """P(y > k) for k = 0..K-2, (B, K-1), non-increasing along k."""
        return F.logsigmoid(logits).cumsum(dim=1).exp()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        # P(y = k) = P(y > k-1) (1 - sigmoid(l_k)), in log space: no subtraction of two small probabilities
        log_above_BK = F.pad(F.logsigmoid(logits).cumsum(dim=1), (1, 0))  # log P(y > k-1), k = 0..K-1
        log_stop_BK = F.pad(F.logsigmoid(-logits), (0, 1))  # log(1 - sigmoid(l_k)); the last grade always stops
        return (log_above_BK + log_stop_BK).exp()

    def loss(self, logits: torch.Tensor, target_BK: torch.Tensor) -> torch.Tensor:
        _check_target((logits.shape[0], self.num_classes), target_BK)
        above_BK = target_BK.flip(1).cumsum(dim=1).flip(1)  # T(y >= k) = T(y > k-1)
        in_task, positive, negative = above_BK[:, :-1], above_BK[:, 1:], target_BK[:, :-1]
        log_likelihood = positive * F.logsigmoid(logits) + negative * F.logsigmoid(-logits)
        return -log_likelihood.sum() / in_task.sum()


@ORDINAL_HEADS.register("cumulative_link", rank_consistent=True)
class CumulativeLinkHead(OrdinalHead):
    """Proportional odds / cumulative logit (McCullagh 1980, "Regression models for ordinal data"): one score
    s = Linear(F, 1) and thresholds theta_0 < ... < theta_{K-2}, P(y <= k) = sigmoid(theta_k - s).

    The thresholds are theta_0 + cumsum(softplus(deltas) + MIN_THRESHOLD_GAP), ordered by construction whatever
    the optimiser does. `forward` returns log P(y = k) (B, K), computed without subtracting two sigmoids:
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - exp(-(a - b))), so the softmax of the logits is the
    model's distribution and the loss is the soft-target cross-entropy (the negative log-likelihood).
    """

    def __init__(self, in_features: int, num_classes: int, *, bias: bool = True):
        super().__init__(in_features, num_classes, bias=bias)
        # start with thresholds one logit apart, centred on 0
        self.first_threshold = nn.Parameter(torch.tensor(-(num_classes - 2) / 2.0))
        unit_gap = math.log(math.expm1(1.0 - MIN_THRESHOLD_GAP))  # softplus^-1
        self.gap_parameters = nn.Parameter(torch.full((num_classes - 2,), unit_gap))

    @staticmethod
    def linear_outputs(num_classes: int) -> int:
        return 1  # the score s

    def threshold_gaps(self) -> torch.Tensor:
        """theta_k - theta_{k-1} for k = 1..K-2, each at least MIN_THRESHOLD_GAP."""
        return F.softplus(self.gap_parameters) + MIN_THRESHOLD_GAP

    def thresholds(self) -> torch.Tensor:
        """The ordered thresholds theta_0 < ... < theta_{K-2}, (K-1,)."""
        offsets = F.pad(self.threshold_gaps().cumsum(dim=0), (1, 0))
        return self.first_threshold + offsets

    def forward(self, x_BF: torch.Tensor) -> torch.Tensor:
        cumulative_logits = self.thresholds()[None, :] - self.linear(x_BF)  # theta_k - s, (B, K-1)
        first = F.logsigmoid(cumulative_logits[:, :1])
        last = F.logsigmoid(-cumulative_logits[:, -1:])
        middle = (F.logsigmoid(cumulative_logits[:, 1:]) + F.logsigmoid(-cumulative_logits[:, :-1])
                  + torch.log(-torch.expm1(-self.threshold_gaps())))
        return torch.cat([first, middle, last], dim=1)
