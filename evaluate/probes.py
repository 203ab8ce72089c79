"""Downstream probes and adaptors behind one registry (`create_probe`), plus few-shot subsets and the ordinal
metrics (quadratic weighted kappa, Spearman) the probes are scored with.

Every embedding probe honours one contract: `fit(emb_ND, labels_N)` returns the probe; `scores(emb_ND)` gives a
continuous score per scan (positive-class probability for binary targets, an `(N, C)` probability matrix
for more classes, the regression output or expected rank for continuous and ordinal targets);
`predict(emb_ND)` gives a label per scan. The registry tag `targets` says which target kind a probe is for, the
tag `inputs` what it takes: "embeddings" (the default), or "volumes" for the gradient adaptors of
`rafmedia.evaluate.finetune` (`fit(encoder, volumes_NCDHW, labels_N)`, `scores(volumes_NCDHW)`), registered here
so that `raf list probes` shows them all.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry, unknown_name_error
from rafmedia.evaluate.finetune import FullFineTune, LoraAdaptor, PartialFineTune, check_augmentation, check_budget

PROBES: Registry = Registry("probe")
KNN_METRICS = ("cosine", "euclidean")


def create_probe(name: str, **options):
    """Builds the probe registered as `name` (e.g. `create_probe("knn", k_grid=(20,))`)."""
    return PROBES.create(name, **options)


def list_probes() -> list[str]:
    return PROBES.names()


def describe_probes() -> list[str]:
    """One line per registered probe with what it takes, e.g. "lora (targets=categorical, inputs=volumes)"."""
    return [f"{name} (targets={PROBES.tags(name).get('targets')}, inputs={probe_inputs(name)})"
            for name in PROBES.names()]


def categorical_probes() -> list[str]:
    """The embedding probes registered for categorical (binary) targets, `targets="categorical"`: what an evaluation
    can use as its primary probe, and scores on the primary target. Volume adaptors (`inputs="volumes"`) are not
    among them: they run in the adaptor protocol (`rafmedia.evaluate.adaptors`)."""
    return [name for name in PROBES.names() if PROBES.tags(name).get("targets") == "categorical"
            and probe_inputs(name) == "embeddings"]


def probe_inputs(name: str) -> str:
    """What probe `name` takes: "embeddings" (frozen embeddings, the default) or "volumes" (a gradient adaptor)."""
    return PROBES.tags(name).get("inputs", "embeddings")


def volume_adaptors() -> list[str]:
    """The registered adaptors that train on volumes (`inputs="volumes"`): fine-tuning and LoRA."""
    return [name for name in PROBES.names() if probe_inputs(name) == "volumes"]


def _check_classes(labels_N: np.ndarray) -> np.ndarray:
    """Per-class counts of a classification target; fewer than two classes cannot be probed."""
    classes, counts = np.unique(labels_N, return_counts=True)
    if len(classes) < 2:
        raise UserError(f"a classification probe needs at least two classes in the training labels; got "
                        f"{classes.tolist()}: check the target column and the split")
    return counts


def _cv_folds(counts: np.ndarray) -> int:
    """Stratified 3-fold CV, fewer when the rarest class has fewer than 3 members (< 2 means no CV)."""
    return min(3, int(counts.min()))


def _auroc_scoring(counts: np.ndarray) -> str:
    return "roc_auc" if len(counts) == 2 else "roc_auc_ovr"


def _class_scores(probabilities_NC: np.ndarray) -> np.ndarray:
    """Positive-class probability for binary targets, the full probability matrix otherwise."""
    return probabilities_NC[:, 1] if probabilities_NC.shape[1] == 2 else probabilities_NC


def _grid_search(pipeline, parameter: str, grid: Sequence, emb_ND, labels_N, *, folds: int, scoring: str, seed: int):
    """Refits `pipeline` on all data with the grid value of best stratified-CV score (first on ties)."""
    search = GridSearchCV(pipeline, {parameter: list(grid)}, scoring=scoring,
                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return search.fit(emb_ND, labels_N).best_estimator_


@dataclass
class LogisticProbe:
    """Standardised features + L2 logistic regression; C picked from `c_grid` by stratified 3-fold CV AUROC
    (one-vs-rest macro AUROC for more than two classes)."""

    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    seed: int = 0

    def fit(self, emb_ND: np.ndarray, labels_N: np.ndarray) -> LogisticProbe:
        counts = _check_classes(labels_N)
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        folds = _cv_folds(counts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on tiny test cohorts
            if folds >= 2 and len(self.c_grid) > 1:
                self.model_ = _grid_search(pipeline, "logisticregression__C", self.c_grid, emb_ND, labels_N,
                                           folds=folds, scoring=_auroc_scoring(counts), seed=self.seed)
            else:
                self.model_ = pipeline.set_params(logisticregression__C=self.c_grid[0]).fit(emb_ND, labels_N)
        return self

    def scores(self, emb_ND: np.ndarray) -> np.ndarray:
        """Probability of the positive class (binary targets); `(N, C)` probabilities for more classes."""
        return _class_scores(self.model_.predict_proba(emb_ND))

    def predict(self, emb_ND: np.ndarray) -> np.ndarray:
        return self.model_.predict(emb_ND)


@PROBES.register("logistic", targets="categorical")
def logistic(c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), seed: int = 0) -> LogisticProbe:
    return LogisticProbe(c_grid=tuple(c_grid), seed=seed)


@dataclass
class KNNProbe:
    """Standardised features + k-nearest-neighbour vote (as DINO's k-NN evaluation, uniform weights).

    `scores` is the fraction of the k neighbours in the positive class (sklearn `KNeighborsClassifier
    .predict_proba`). k is picked from `k_grid` by stratified 3-fold CV AUROC and clipped to the number of
    training embeddings (during CV, to the smallest fold's training size).
    """

    k_grid: tuple[int, ...] = (10, 20)
    metric: str = "cosine"
    seed: int = 0

    def fit(self, emb_ND: np.ndarray, labels_N: np.ndarray) -> KNNProbe:
        counts = _check_classes(labels_N)
        # Brute force: exact neighbours for cosine, which the tree indexes do not support.
        pipeline = make_pipeline(StandardScaler(), KNeighborsClassifier(metric=self.metric, algorithm="brute"))
        num_train, folds = len(labels_N), _cv_folds(counts)
        if folds >= 2 and len(self.k_grid) > 1:
            fold_train = num_train - int(np.ceil(num_train / folds))
            grid = sorted({min(k, fold_train) for k in self.k_grid})
            self.model_ = _grid_search(pipeline, "kneighborsclassifier__n_neighbors", grid, emb_ND, labels_N,
                                       folds=folds, scoring=_auroc_scoring(counts), seed=self.seed)
        else:
            self.model_ = pipeline.set_params(kneighborsclassifier__n_neighbors=min(self.k_grid[0], num_train))
            self.model_.fit(emb_ND, labels_N)
        self.k_ = int(self.model_[-1].n_neighbors)
        return self

    def scores(self, emb_ND: np.ndarray) -> np.ndarray:
        """Fraction of positive neighbours (binary); `(N, C)` neighbour fractions for more classes."""
        return _class_scores(self.model_.predict_proba(emb_ND))

    def predict(self, emb_ND: np.ndarray) -> np.ndarray:
        return self.model_.predict(emb_ND)


@PROBES.register("knn", targets="categorical")
def knn(k_grid: tuple[int, ...] = (10, 20), metric: str = "cosine", seed: int = 0) -> KNNProbe:
    if metric not in KNN_METRICS:
        raise unknown_name_error("knn metric", metric, KNN_METRICS)
    if not k_grid or any(int(k) < 1 for k in k_grid):
        raise UserError(f"knn k_grid must hold positive neighbour counts (e.g. (10, 20)); got {k_grid}")
    return KNNProbe(k_grid=tuple(int(k) for k in k_grid), metric=metric, seed=seed)


@dataclass
class MLPProbe:
    """Standardised features + a one-hidden-layer ReLU MLP (scikit-learn `MLPClassifier`, Adam), trained for a fixed
    budget of `max_iter` epochs (no early stopping: the budget is the same whatever the label count), weights drawn
    from `seed`. `scores` is the positive-class probability, as `LogisticProbe`'s."""

    hidden: int = 64
    alpha: float = 1e-3
    max_iter: int = 300
    seed: int = 0

    def fit(self, emb_ND: np.ndarray, labels_N: np.ndarray) -> MLPProbe:
        _check_classes(labels_N)
        mlp = MLPClassifier(hidden_layer_sizes=(self.hidden,), alpha=self.alpha, max_iter=self.max_iter,
                            learning_rate_init=1e-2, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge" is the fixed budget doing its job
            self.model_ = make_pipeline(StandardScaler(), mlp).fit(emb_ND, labels_N)
        return self

    def scores(self, emb_ND: np.ndarray) -> np.ndarray:
        """Probability of the positive class (binary targets); `(N, C)` probabilities for more classes."""
        return _class_scores(self.model_.predict_proba(emb_ND))

    def predict(self, emb_ND: np.ndarray) -> np.ndarray:
        return self.model_.predict(emb_ND)


@PROBES.register("mlp", targets="categorical")
def mlp(hidden: int = 64, alpha: float = 1e-3, max_iter: int = 300, seed: int = 0) -> MLPProbe:
    if hidden < 1 or alpha < 0 or max_iter < 1:
        raise UserError(f"mlp needs hidden >= 1, alpha >= 0 and max_iter >= 1; got hidden={hidden}, alpha={alpha}, "
                        f"max_iter={max_iter}")
    return MLPProbe(hidden=int(hidden), alpha=float(alpha), max_iter=int(max_iter), seed=seed)


# ---- gradient adaptors (rafmedia.evaluate.finetune): volumes in, the same compute budget for each ---------------
@PROBES.register("finetune_full", targets="categorical", inputs="volumes")
def finetune_full(steps: int = 50, batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 0.01,
                  augmentation: str = "flips", threads: int = 1, seed: int = 0) -> FullFineTune:
    check_budget(steps, batch_size, lr, threads)
    return FullFineTune(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                        augmentation=check_augmentation(augmentation), threads=threads, seed=seed)


@PROBES.register("finetune_partial", targets="categorical", inputs="volumes")
def finetune_partial(steps: int = 50, batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 0.01,
                     augmentation: str = "flips", threads: int = 1, seed: int = 0,
                     tail_blocks: int = 2) -> PartialFineTune:
    check_budget(steps, batch_size, lr, threads)
    return PartialFineTune(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           augmentation=check_augmentation(augmentation), threads=threads, seed=seed,
                           tail_blocks=tail_blocks)


@PROBES.register("lora", targets="categorical", inputs="volumes")
def lora(steps: int = 50, batch_size: int = 8, lr: float = 3e-3, weight_decay: float = 0.01,
         augmentation: str = "flips", threads: int = 1, seed: int = 0, rank: int = 4, alpha: float = 8.0) -> LoraAdaptor:
    check_budget(steps, batch_size, lr, threads)
    if rank < 1 or alpha <= 0:
        raise UserError(f"lora needs rank >= 1 and alpha > 0; got rank={rank}, alpha={alpha}")
    return LoraAdaptor(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       augmentation=check_augmentation(augmentation), threads=threads, seed=seed, rank=rank, alpha=alpha)


@dataclass
class LinearProbe:
    """Standardised features + ridge regression for continuous or ordinal targets; alpha picked from
    `alpha_grid` by efficient leave-one-out CV (sklearn `RidgeCV`). `scores` and `predict` are the
    regression output."""

    alpha_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)

    def fit(self, emb_ND: np.ndarray, targets_N: np.ndarray) -> LinearProbe:
        targets_N = np.asarray(targets_N, dtype=np.float64)
        if not np.all(np.isfinite(targets_N)):
            raise UserError(f"the linear probe needs finite targets; {int((~np.isfinite(targets_N)).sum())} are "
                            "NaN or infinite: drop those scans or impute the target")
        self.model_ = make_pipeline(StandardScaler(), RidgeCV(alphas=list(self.alpha_grid))).fit(emb_ND, targets_N)
        self.alpha_ = float(self.model_[-1].alpha_)
        return self

    def scores(self, emb_ND: np.ndarray) -> np.ndarray:
        return self.model_.predict(emb_ND)

    def predict(self, emb_ND: np.ndarray) -> np.ndarray:
        return self.model_.predict(emb_ND)


@PROBES.register("linear", targets="continuous")
def linear(alpha_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0)) -> LinearProbe:
    if not alpha_grid or any(float(a) <= 0 for a in alpha_grid):
        raise UserError(f"linear alpha_grid must hold positive ridge penalties (e.g. (0.1, 1, 10)); got {alpha_grid}")
    return LinearProbe(alpha_grid=tuple(float(a) for a in alpha_grid))


@dataclass
class OrdinalProbe:
    """Ordinal logistic probe (Frank & Hall 2001, "A simple approach to ordinal classification"): one
    `LogisticProbe` per threshold estimates P(y > c_k) for the ordered classes c_0 < ... < c_{K-1}.

    `scores` is the expected rank E[rank] = sum_k P(y > c_k), in [0, K-1]; `predict` is the class at the
    rounded expected rank (round half up), not the argmax, which suits quadratic weighted kappa.
    """

    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    seed: int = 0

    def fit(self, emb_ND: np.ndarray, labels_N: np.ndarray) -> OrdinalProbe:
        _check_classes(labels_N)
        self.classes_ = np.unique(labels_N)
        self.thresholds_ = [LogisticProbe(c_grid=self.c_grid, seed=self.seed).fit(emb_ND, (labels_N > c).astype(int))
                            for c in self.classes_[:-1]]
        return self

    def scores(self, emb_ND: np.ndarray) -> np.ndarray:
        return np.sum([probe.scores(emb_ND) for probe in self.thresholds_], axis=0)

    def predict(self, emb_ND: np.ndarray) -> np.ndarray:
        ranks = np.clip(np.floor(self.scores(emb_ND) + 0.5), 0, len(self.classes_) - 1).astype(int)
        return self.classes_[ranks]


@PROBES.register("ordinal", targets="ordinal")
def ordinal(c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), seed: int = 0) -> OrdinalProbe:
    return OrdinalProbe(c_grid=tuple(c_grid), seed=seed)


def few_shot_indices(labels_N: np.ndarray, fraction: float, *, seed: int, min_per_class: int = 1) -> np.ndarray:
    """Stratified few-shot subset of the training labels (e.g. 1%, 10%, 100%), seeded.

    Each class c keeps max(min_per_class, round(fraction * n_c)) members (round half up, at most n_c), so a
    subset may hold slightly more than `fraction` of the labels. Subsets are nested: for one seed every class
    is shuffled once, independently of `fraction`, and a subset takes a prefix, so the 1% subset lies inside
    the 10% one.

    Args:
        labels_N: discrete training labels.
        fraction: share of each class to keep, in (0, 1].
        seed: seed of the per-class shuffles.
        min_per_class: smallest number kept per class (all members when a class is smaller).

    Returns:
        Sorted indices into `labels_N`.
    """
    if not 0 < fraction <= 1:
        raise UserError(f"few-shot fraction must be in (0, 1] (e.g. 0.01, 0.1, 1.0); got {fraction}")
    if min_per_class < 1:
        raise UserError(f"few-shot min_per_class must be at least 1; got {min_per_class}")
    rng = np.random.default_rng(seed)
    _, codes = np.unique(np.asarray(labels_N), return_inverse=True)
    chosen = []
    for code in range(int(codes.max()) + 1 if len(codes) else 0):
        shuffled = rng.permutation(np.flatnonzero(codes == code))
        count = min(len(shuffled), max(min_per_class, int(np.floor(fraction * len(shuffled) + 0.5))))
        chosen.append(shuffled[:count])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def _paired(y_true, y_other, what: str) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_other = np.asarray(y_true).ravel(), np.asarray(y_other).ravel()
    if len(y_true) != len(y_other):
        raise UserError(f"{what} needs one prediction per label; got {len(y_true)} labels and {len(y_other)} values")
    return y_true, y_other


def quadratic_weighted_kappa(y_true: Sequence, y_pred: Sequence, *, labels: Sequence | None = None) -> float:
    """Cohen's kappa with quadratic weights (as sklearn `cohen_kappa_score(weights="quadratic")`):

    1 - sum_ij W_ij O_ij / sum_ij W_ij E_ij, with O the confusion matrix, E the outer product of its
    marginals / N, and W_ij = (i - j)^2 over the indices of the ordered `labels` (default: the sorted
    union of observed values; pass the full rating scale to match Kaggle's definition). NaN when undefined
    (no items, or both raters constant on one class).
    """
    y_true, y_pred = _paired(y_true, y_pred, "quadratic_weighted_kappa")
    labels = np.unique(np.concatenate([y_true, y_pred])) if labels is None else np.asarray(labels)
    position = {value: index for index, value in enumerate(labels.tolist())}
    unknown = sorted({value for value in np.concatenate([y_true, y_pred]).tolist() if value not in position})
    if unknown:
        raise UserError(f"quadratic_weighted_kappa: values {unknown} are not in labels {labels.tolist()}; "
                        "add them to labels")
    if len(y_true) == 0:
        return float("nan")
    observed_KK = np.zeros((len(labels), len(labels)))
    np.add.at(observed_KK, ([position[v] for v in y_true.tolist()], [position[v] for v in y_pred.tolist()]), 1)
    expected_KK = np.outer(observed_KK.sum(axis=1), observed_KK.sum(axis=0)) / len(y_true)
    index = np.arange(len(labels))
    weights_KK = (index[:, None] - index[None, :]) ** 2.0
    denominator = float(np.sum(weights_KK * expected_KK))
    return 1.0 - float(np.sum(weights_KK * observed_KK)) / denominator if denominator > 0 else float("nan")


def spearman(y_true: Sequence[float], y_score: Sequence[float]) -> float:
    """Spearman rank correlation = Pearson correlation of average ranks (ties share their mean rank), as
    `scipy.stats.spearmanr`. NaN with fewer than two items or a constant input."""
    y_true, y_score = _paired(y_true, y_score, "spearman")
    if len(y_true) < 2:
        return float("nan")
    rank_true, rank_score = stats.rankdata(y_true), stats.rankdata(y_score)
    rank_true, rank_score = rank_true - rank_true.mean(), rank_score - rank_score.mean()
    denominator = np.sqrt(np.dot(rank_true, rank_true) * np.dot(rank_score, rank_score))
    return float(np.dot(rank_true, rank_score) / denominator) if denominator > 0 else float("nan")


def attribute_leakage_auroc(emb_ND: np.ndarray, attribute_N: np.ndarray, *, seed: int, folds: int = 5) -> float:
    """How well an attribute (site, sex) is predicted from embeddings: cross-validated one-vs-rest macro AUROC."""
    values, codes = np.unique(attribute_N, return_inverse=True)
    folds = min(folds, int(np.bincount(codes).min()))
    if len(values) < 2 or folds < 2:
        return float("nan")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        probabilities = cross_val_predict(model, emb_ND, codes, method="predict_proba",
                                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    if len(values) == 2:
        return float(roc_auc_score(codes, probabilities[:, 1]))
    return float(roc_auc_score(codes, probabilities, multi_class="ovr", average="macro"))
