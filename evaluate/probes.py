"""Downstream probes on frozen embeddings, behind a registry (`create_probe`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from rafmedia.engine.registry import Registry

PROBES: Registry = Registry("probe")


def create_probe(name: str, **options):
    return PROBES.create(name, **options)


def list_probes() -> list[str]:
    return PROBES.names()


@dataclass
class LogisticProbe:
    """Standardised features + L2 logistic regression; C picked from `c_grid` by stratified 3-fold CV AUROC."""

    c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    seed: int = 0

    def fit(self, emb_ND: np.ndarray, labels_N: np.ndarray) -> "LogisticProbe":
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV, StratifiedKFold
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        folds = min(3, int(np.bincount(labels_N).min()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter on tiny test cohorts
            if folds >= 2 and len(self.c_grid) > 1:
                search = GridSearchCV(pipeline, {"logisticregression__C": list(self.c_grid)}, scoring="roc_auc",
                                      cv=StratifiedKFold(folds, shuffle=True, random_state=self.seed))
                self.model_ = search.fit(emb_ND, labels_N).best_estimator_
            else:
                self.model_ = pipeline.set_params(logisticregression__C=self.c_grid[0]).fit(emb_ND, labels_N)
        return self

    def scores(self, emb_ND: np.ndarray) -> np.ndarray:
        """Probability of the positive class (binary targets)."""
        return self.model_.predict_proba(emb_ND)[:, 1]

    def predict(self, emb_ND: np.ndarray) -> np.ndarray:
        return self.model_.predict(emb_ND)


@PROBES.register("logistic")
def logistic(c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0), seed: int = 0) -> LogisticProbe:
    return LogisticProbe(c_grid=tuple(c_grid), seed=seed)


def attribute_leakage_auroc(emb_ND: np.ndarray, attribute_N: np.ndarray, *, seed: int, folds: int = 5) -> float:
    """How well an attribute (site, sex) is predicted from embeddings: cross-validated one-vs-rest macro AUROC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

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
