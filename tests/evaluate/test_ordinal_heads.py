"""Ordinal heads and losses against scikit-learn's kappa, autograd's finite differences, the CORN paper's formula
and hand-computed distributions."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import cohen_kappa_score

from rafmedia.core.errors import UserError
from rafmedia.evaluate.mil import one_thread
from rafmedia.evaluate.ordinal_heads import (ORDINAL_HEADS, create_ordinal_head, expected_grade, list_ordinal_heads,
                                             median_grade, smooth_labels, soft_qwk_loss)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny full-batch fits: one thread, as the MIL probe trains (two threads spin against the other CI process)."""
    with one_thread():
        yield


HEADS = ["corn", "cross_entropy", "cumulative_link", "qwk"]


def train(head, x_BF: torch.Tensor, target_BK: torch.Tensor, *, steps: int, lr: float) -> torch.Tensor:
    """Full-batch Adam; returns the last loss."""
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = head.loss(head(x_BF), target_BK)
        loss.backward()
        optimizer.step()
    return loss.detach()


def test_registry_lists_the_heads_with_rank_consistency_and_rejects_bad_input():
    assert list_ordinal_heads() == HEADS
    assert {name for name in HEADS if ORDINAL_HEADS.tags(name)["rank_consistent"]} == {"corn", "cumulative_link"}
    with pytest.raises(UserError, match="did you mean 'corn'"):
        create_ordinal_head("cron", 4, 3)
    with pytest.raises(UserError, match="num_classes"):
        create_ordinal_head("corn", 4, 1)
    with pytest.raises(UserError, match="has no option 'width'"):
        create_ordinal_head("qwk", 4, 3, width=2)
    with pytest.raises(UserError, match=r"shape \(2, 3\)"):
        create_ordinal_head("corn", 4, 3).loss(torch.zeros(2, 2), torch.zeros(2, 4))


@pytest.mark.parametrize("name", HEADS)
def test_every_head_gives_a_distribution_and_a_differentiable_loss(name):
    torch.manual_seed(0)
    head = create_ordinal_head(name, 3, 5, bias=False)
    assert head.linear.bias is None
    logits = head(10.0 * torch.randn(64, 3))  # large features saturate the sigmoids
    probabilities = head.probabilities(logits)
    assert probabilities.shape == (64, 5) and probabilities.min() >= 0
    torch.testing.assert_close(probabilities.sum(1), torch.ones(64))
    loss = head.loss(logits, smooth_labels(torch.arange(64) % 5, 5, 0.2))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in head.parameters())


def test_soft_qwk_loss_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.rand(12, 4, dtype=torch.float64, generator=generator)
    target = (target / target.sum(1, keepdim=True)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z, t: soft_qwk_loss(z.softmax(dim=1), t), (logits, target))


def test_soft_qwk_loss_of_one_hot_predictions_is_one_minus_cohen_quadratic_kappa():
    rng = np.random.default_rng(0)
    for _ in range(5):
        truth, predicted = rng.permutation(np.arange(40) % 5), rng.integers(0, 5, 40)  # all 5 grades appear
        predicted = np.where(rng.random(40) < 0.5, truth, predicted)
        loss = soft_qwk_loss(F.one_hot(torch.tensor(predicted), 5).double(), F.one_hot(torch.tensor(truth), 5).double())
        reference = 1.0 - cohen_kappa_score(truth, predicted, weights="quadratic")
        assert 0.05 < reference < 0.95
        assert loss.item() == pytest.approx(reference, abs=1e-12)


def test_cumulative_link_thresholds_stay_ordered_under_adversarial_training():
    """Only the end grades of 5 are observed (so the likelihood pulls the middle thresholds together), in
    reversed order of x and overlapping, and Adam takes steps of about 1 logit."""
    generator = torch.Generator().manual_seed(0)
    grades = torch.tensor([0, 4]).repeat(100)
    x = (-grades.float() + 3.0 * torch.randn(200, generator=generator))[:, None]
    torch.manual_seed(0)
    head = create_ordinal_head("cumulative_link", 1, 5)
    loss = train(head, x, smooth_labels(grades, 5, 0.0), steps=200, lr=1.0)
    thresholds = head.thresholds().detach()
    assert thresholds.shape == (4,) and (thresholds.diff() > 0).all()
    assert head.linear.weight.item() < 0  # learnt that x falls as the grade rises
    assert torch.isfinite(loss) and loss < np.log(2)  # better than 50:50 between the two observed grades
    probabilities = head.probabilities(head(x)).detach()
    assert probabilities.min() >= 0
    torch.testing.assert_close(probabilities.sum(1), torch.ones(200))
    # the model's P(y <= k) is sigmoid(theta_k - s), recovered from the distribution
    cumulative = torch.sigmoid(thresholds[None, :] - head.linear(x).detach())
    torch.testing.assert_close(probabilities.cumsum(1)[:, :-1], cumulative, atol=1e-5, rtol=0)


def corn_loss_of_the_paper(logits_BK1: torch.Tensor, grades_B: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Shi, Cao & Raschka 2021, eq. for L(X, y): task k trains on the samples with y > k-1, label 1[y > k];
    binary cross-entropies summed over tasks and divided by the total number of (sample, task) pairs."""
    total, count = 0.0, 0
    for k in range(num_classes - 1):
        subset = grades_B > k - 1
        labels = (grades_B[subset] > k).double()
        probability = torch.sigmoid(logits_BK1[subset, k])
        total = total - (labels * torch.log(probability) + (1 - labels) * torch.log(1 - probability)).sum()
        count += int(subset.sum())
    return total / count


def test_corn_loss_equals_the_paper_and_its_exceedance_is_non_increasing():
    torch.manual_seed(0)
    head = create_ordinal_head("corn", 6, 5).double()
    grades = torch.tensor([0, 1, 2, 3, 4, 4, 2, 1, 3, 0, 2, 2])
    logits = head(torch.randn(12, 6, dtype=torch.float64))
    loss = head.loss(logits, smooth_labels(grades, 5, 0.0).double())
    assert loss.item() == pytest.approx(corn_loss_of_the_paper(logits, grades, 5).item(), abs=1e-12)
    exceedance = head.exceedance_probabilities(logits)
    assert (exceedance.diff(dim=1) <= 0).all() and (exceedance.diff(dim=1) < 0).any()
    torch.testing.assert_close(head.probabilities(logits).flip(1).cumsum(1).flip(1)[:, 1:], exceedance)


def test_corn_soft_target_loss_is_minimised_by_the_target_distribution():
    """A proper scoring rule: free logits fitted to smoothed targets give back those targets as probabilities,
    i.e. sigmoid(l_k) = T(y > k) / T(y > k-1)."""
    head = create_ordinal_head("corn", 1, 4).double()
    target = smooth_labels(torch.tensor([0, 1, 2, 3]), 4, 0.4).double()
    logits = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = head.loss(logits, target)
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(head.probabilities(logits).detach(), target, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", HEADS)
def test_each_head_learns_a_one_dimensional_ordinal_problem(name):
    """x = grade + N(0, 0.5^2) on 4 grades: thresholds half-way between grades misplace about 32% of the samples,
    nearly all by one grade, so a good fit scores a quadratic kappa near 0.9."""
    rng = np.random.default_rng(0)
    grades = rng.integers(0, 4, 400)
    x = torch.tensor(grades + rng.normal(0.0, 0.5, 400), dtype=torch.float32)[:, None]
    train_rows, test_rows = np.arange(300), np.arange(300, 400)
    torch.manual_seed(0)
    head = create_ordinal_head(name, 1, 4)
    train(head, x[train_rows], smooth_labels(torch.tensor(grades[train_rows]), 4, 0.0), steps=300, lr=0.1)
    with torch.no_grad():
        predicted = median_grade(head.probabilities(head(x[test_rows]))).numpy()
    assert cohen_kappa_score(grades[test_rows], predicted, weights="quadratic") > 0.8


def test_smooth_labels_moves_epsilon_to_the_neighbouring_grades():
    target = smooth_labels(torch.tensor([0, 2, 3]), 4, 0.2)
    expected = torch.tensor([[0.8, 0.2, 0.0, 0.0], [0.0, 0.1, 0.8, 0.1], [0.0, 0.0, 0.2, 0.8]])
    torch.testing.assert_close(target, expected)
    rows = smooth_labels(torch.arange(50) % 7, 7, 0.3)
    torch.testing.assert_close(rows.sum(1), torch.ones(50))
    torch.testing.assert_close(smooth_labels(torch.tensor([1, 0, 2]), 3, 0.0), torch.eye(3)[[1, 0, 2]])
    for epsilon in (-0.1, 1.0, float("nan")):
        with pytest.raises(UserError, match="epsilon"):
            smooth_labels(torch.tensor([0, 1]), 3, epsilon)
    with pytest.raises(UserError, match="grades"):
        smooth_labels(torch.tensor([0, 3]), 3, 0.1)


def test_median_and_expected_grade_of_hand_computed_distributions():
    probabilities = torch.tensor([[0.1, 0.2, 0.3, 0.4],  # cumulative 0.1 0.3 0.6 1.0
                                  [0.5, 0.0, 0.0, 0.5],  # reaches 0.5 exactly at grade 0
                                  [0.0, 0.0, 0.0, 1.0],
                                  [0.3, 0.1, 0.0, 0.6]])  # cumulative 0.3 0.4 0.4 1.0
    assert median_grade(probabilities).tolist() == [2, 0, 3, 3]
    assert median_grade(probabilities).dtype == torch.long
    torch.testing.assert_close(expected_grade(probabilities), torch.tensor([2.0, 1.5, 3.0, 1.9]))
