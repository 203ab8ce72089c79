"""Label-free latent-space bias tests on clean embeddings: Frechet distances between subgroups, attribute
leakage, site clustering (silhouette), distance-based out-of-distribution scores and collapse (RankMe)."""
from __future__ import annotations

from typing import Any

import numpy as np

from rafmedia.core.errors import UserError
from rafmedia.evaluate.metrics import compute_auroc, frechet_distance, rankme
from rafmedia.evaluate.probes import attribute_leakage_auroc


def standardize(emb_ND: np.ndarray) -> np.ndarray:
    """Z-scores each embedding dimension over the cohort, so distances are comparable across encoders whose
    embeddings have different scales (a random-init encoder's are orders of magnitude smaller)."""
    return (emb_ND - emb_ND.mean(axis=0)) / np.maximum(emb_ND.std(axis=0), 1e-12)


def frechet_matrix(emb_ND: np.ndarray, groups_N: np.ndarray) -> dict[str, Any]:
    """Pairwise Frechet distances between groups' standardised embeddings, and each group's mean distance to
    the others."""
    emb_ND = standardize(emb_ND)
    names = sorted(set(groups_N.tolist()))
    matrix = np.zeros((len(names), len(names)))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            matrix[i, j] = matrix[j, i] = frechet_distance(emb_ND[groups_N == a], emb_ND[groups_N == names[j]])
    mean_to_others = {name: float(matrix[i].sum() / max(1, len(names) - 1)) for i, name in enumerate(names)}
    farthest = max(mean_to_others, key=mean_to_others.get) if names else None
    return {"groups": names, "matrix": matrix.tolist(), "mean_to_others": mean_to_others, "farthest": farthest}


def site_silhouette(emb_ND: np.ndarray, groups_N: np.ndarray, *, metric: str = "euclidean") -> float:
    """How strongly embeddings cluster by a grouping (site, scanner): mean silhouette coefficient
    (Rousseeuw 1987; sklearn `silhouette_score`) of the standardised embeddings, in [-1, 1]; near 0 when
    groups are mixed. NaN with fewer than two groups or with every scan its own group (undefined)."""
    groups_N = np.asarray(groups_N)
    if len(groups_N) != len(emb_ND):
        raise UserError(f"site_silhouette needs one group per embedding; got {len(groups_N)} groups for "
                        f"{len(emb_ND)} embeddings")
    num_groups = len(np.unique(groups_N))
    if num_groups < 2 or num_groups >= len(groups_N):
        return float("nan")
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(standardize(np.asarray(emb_ND, dtype=np.float64)), groups_N, metric=metric))


def knn_ood_score(train_emb_ND: np.ndarray, test_emb_MD: np.ndarray, k: int = 10) -> tuple[np.ndarray, dict[str, Any]]:
    """Distance-based out-of-distribution score (deep k-NN, Sun et al. 2022, with mean instead of k-th distance).

    Both sets are z-scored with the training mean and std. A test embedding's statistic is its mean Euclidean
    distance to its k nearest training embeddings; the reference is the mean of the same statistic over
    training embeddings with each point left out of its own neighbours. Scores are statistic / reference:
    about 1 for held-out scans of the training distribution, larger for shifted ones.

    Args:
        train_emb_ND: reference (training) embeddings, N >= 2.
        test_emb_MD: embeddings to score.
        k: neighbours, clipped to N - 1.

    Returns:
        `(scores_M, summary)`: per-test-scan scores and a dict with their mean and median, `exceed_rate` (share
        of test statistics above the 95th percentile of the training ones; about 0.05 in distribution),
        `auroc` (test vs training statistics; 0.5 in distribution), the reference and the k used. Scores are
        NaN when the reference is 0 (all training embeddings identical).
    """
    from sklearn.neighbors import NearestNeighbors

    train_emb_ND, test_emb_MD = np.asarray(train_emb_ND, dtype=np.float64), np.asarray(test_emb_MD, dtype=np.float64)
    if len(train_emb_ND) < 2 or len(test_emb_MD) < 1 or k < 1:
        raise UserError(f"knn_ood_score needs at least 2 training embeddings, 1 test embedding and k >= 1; got "
                        f"{len(train_emb_ND)}, {len(test_emb_MD)} and k={k}")
    k = min(int(k), len(train_emb_ND) - 1)
    mean_D, std_D = train_emb_ND.mean(axis=0), np.maximum(train_emb_ND.std(axis=0), 1e-12)
    neighbours = NearestNeighbors(n_neighbors=k).fit((train_emb_ND - mean_D) / std_D)
    train_stat_N = neighbours.kneighbors()[0].mean(axis=1)  # no query: each point is left out of its own list
    test_stat_M = neighbours.kneighbors((test_emb_MD - mean_D) / std_D)[0].mean(axis=1)
    reference = float(train_stat_N.mean())
    scores_M = test_stat_M / reference if reference > 0 else np.full(len(test_stat_M), np.nan)
    is_test = np.r_[np.zeros(len(train_stat_N)), np.ones(len(test_stat_M))]
    summary = {"mean": float(np.mean(scores_M)), "median": float(np.median(scores_M)),
               "exceed_rate": float(np.mean(test_stat_M > np.quantile(train_stat_N, 0.95))),
               "auroc": compute_auroc(np.r_[train_stat_N, test_stat_M], is_test),
               "reference": reference, "k": k}
    return scores_M, summary


def latent_results(emb_ND: np.ndarray, rows: list[dict[str, Any]], attributes: list[str], *, seed: int,
                   ood_split: tuple[np.ndarray, np.ndarray] | None = None, ood_k: int = 10) -> dict[str, Any]:
    """RankMe and, per attribute, Frechet distances, leakage AUROC and silhouette; with `ood_split=(train
    indices, test indices)` also the `knn_ood_score` summary of the test scans against the train scans."""
    out: dict[str, Any] = {"rankme": rankme(emb_ND), "embed_dim": int(emb_ND.shape[1])}
    for attribute in attributes:
        groups = np.array([str(row[attribute]) for row in rows])
        out[attribute] = {"frechet": frechet_matrix(emb_ND, groups),
                          "leakage_auroc": attribute_leakage_auroc(emb_ND, groups, seed=seed),
                          "silhouette": site_silhouette(emb_ND, groups)}
    if ood_split is not None:
        train_idx, test_idx = ood_split
        out["knn_ood"] = knn_ood_score(emb_ND[np.asarray(train_idx)], emb_ND[np.asarray(test_idx)], k=ood_k)[1]
    return out
