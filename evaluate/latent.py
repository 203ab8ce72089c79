"""Label-free latent-space bias tests on clean embeddings, behind one registry, and the latent stage of an
evaluation cell: Frechet distances between subgroups, attribute leakage, site clustering (silhouette),
distance-based out-of-distribution scores and collapse (RankMe).

A latent test is one registered function (`register_latent_test`):
- scope "attribute": `fn(emb_ND, groups_N, *, seed)`, run once per `evaluate.group_by` attribute;
- scope "cohort": `fn(emb_ND, *, seed, split)`, run once, `split` = (train indices, test indices) of the first
  replicate.
It returns a number (shown under its `title`) or a dict (shown through `columns(result) -> {title: value}`, or
as a table of its own for a cohort test). The stage writes every result, and a "summary" of what the report and
the leaderboard show, so a new test reaches report.json, report.html, report.md and the leaderboard with no
other edit.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from rafmedia.core.errors import UserError
from rafmedia.core.registry import Registry
from rafmedia.evaluate.metrics import compute_auroc, frechet_distance, rankme
from rafmedia.evaluate.probes import attribute_leakage_auroc

LATENT_TESTS = Registry("latent test")
SCOPES = ("attribute", "cohort")


def register_latent_test(name: str, *, scope: str, title: str | None = None,
                         columns: Callable[[dict[str, Any]], dict[str, Any]] | None = None, note: str = ""):
    """Registers a latent test (module docstring) under `name`; `title` names a numeric result in the report,
    `columns` turns a dict result into report columns, `note` explains a cohort test's own table."""
    if scope not in SCOPES:
        raise UserError(f"latent test '{name}': scope must be one of {SCOPES}, got '{scope}'")
    return LATENT_TESTS.register(name, scope=scope, title=title or name, columns=columns, note=note)


def list_latent_tests() -> list[str]:
    return LATENT_TESTS.names()


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
               "auroc": compute_auroc(y_true=is_test, y_score=np.r_[train_stat_N, test_stat_M]),
               "reference": reference, "k": k}
    return scores_M, summary


# ---- the registered tests ---------------------------------------------------------------------------------------
def farthest_group_columns(frechet: dict[str, Any]) -> dict[str, Any]:
    """The group farthest from the others in embedding space and its mean Frechet distance to them."""
    distances = [d for d in frechet["mean_to_others"].values() if d is not None and np.isfinite(d)]
    return {"farthest group": frechet["farthest"], "its mean Frechet distance": max(distances) if distances else None}


@register_latent_test("frechet", scope="attribute", columns=farthest_group_columns)
def frechet_test(emb_ND: np.ndarray, groups_N: np.ndarray, *, seed: int) -> dict[str, Any]:
    return frechet_matrix(emb_ND, groups_N)


@register_latent_test("leakage_auroc", scope="attribute", title="leakage AUROC")
def leakage_test(emb_ND: np.ndarray, groups_N: np.ndarray, *, seed: int) -> float:
    return attribute_leakage_auroc(emb_ND, groups_N, seed=seed)


@register_latent_test("silhouette", scope="attribute")
def silhouette_test(emb_ND: np.ndarray, groups_N: np.ndarray, *, seed: int) -> float:
    return site_silhouette(emb_ND, groups_N)


@register_latent_test("rankme", scope="cohort", title="RankMe")
def rankme_test(emb_ND: np.ndarray, *, seed: int, split: tuple[np.ndarray, np.ndarray]) -> float:
    return rankme(emb_ND)


@register_latent_test("knn_ood", scope="cohort", title="k-NN out-of-distribution scores (test vs training scans)",
                      note="Mean distance to the k nearest training embeddings over the training scans' own "
                           "(left-out) mean: about 1 in distribution. AUROC test vs training about 0.5 in distribution.")
def knn_ood_test(emb_ND: np.ndarray, *, seed: int, split: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    train_idx, test_idx = split
    return knn_ood_score(emb_ND[np.asarray(train_idx)], emb_ND[np.asarray(test_idx)])[1]


# ---- the stage ------------------------------------------------------------------------------------------------
def result_columns(name: str, result: Any) -> dict[str, Any]:
    """What the report shows of one test's result: its number under its title, or its `columns`."""
    tags = LATENT_TESTS.tags(name)
    if isinstance(result, dict):
        return tags["columns"](result) if tags["columns"] is not None else {}
    return {tags["title"]: result}


def latent_results(emb_ND: np.ndarray, rows: list[dict[str, Any]], attributes: list[str], *, seed: int,
                   split: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Every registered latent test on the clean embeddings: cohort tests once (under their name), attribute tests
    per attribute (under `out[attribute][name]`); "summary" holds the report's columns per attribute, "tables" the
    cohort tests shown as tables of their own, "projection" the 2-D PCA of the embeddings."""
    out: dict[str, Any] = {"embed_dim": int(emb_ND.shape[1])}
    cohort_columns: dict[str, Any] = {}
    out["tables"] = {}
    for name in LATENT_TESTS.names():
        if LATENT_TESTS.tags(name)["scope"] == "cohort":
            out[name] = LATENT_TESTS.get(name)(emb_ND, seed=seed, split=split)
            if isinstance(out[name], dict) and LATENT_TESTS.tags(name)["columns"] is None:
                out["tables"][name] = {"title": LATENT_TESTS.tags(name)["title"],
                                       "note": LATENT_TESTS.tags(name)["note"]}
            else:
                cohort_columns.update(result_columns(name, out[name]))
    out["summary"] = {}
    for attribute in attributes:
        groups = np.array([str(row[attribute]) for row in rows])
        out[attribute] = {name: LATENT_TESTS.get(name)(emb_ND, groups, seed=seed) for name in LATENT_TESTS.names()
                          if LATENT_TESTS.tags(name)["scope"] == "attribute"}
        out["summary"][attribute] = {key: value for name, result in out[attribute].items()
                                     for key, value in result_columns(name, result).items()}
        out["summary"][attribute].update(cohort_columns)
    out["projection"] = projection(emb_ND)
    return out


def projection(emb_ND: np.ndarray) -> dict[str, list[float]]:
    """2-D PCA of the standardised clean embeddings, one point per subject in manifest order (for the report)."""
    xy = PCA(n_components=2, random_state=0).fit_transform(standardize(emb_ND))
    return {"x": xy[:, 0].round(5).tolist(), "y": xy[:, 1].round(5).tolist()}


def headline(latent: dict[str, Any]) -> dict[str, float]:
    """The leaderboard's latent columns: every numeric column of every test, per attribute for the attribute tests
    ("leakage AUROC (site)"), once for the cohort tests ("RankMe")."""
    out: dict[str, float] = {}
    for name in LATENT_TESTS.names():
        if LATENT_TESTS.tags(name)["scope"] == "cohort":
            shown = {} if name in latent["tables"] else result_columns(name, latent[name])
        else:
            shown = {f"{title} ({attribute})": value for attribute in latent["summary"]
                     for title, value in result_columns(name, latent[attribute][name]).items()}
        out.update({title: value for title, value in shown.items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return out
