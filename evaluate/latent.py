"""Label-free latent-space bias tests on clean embeddings: Frechet distances between subgroups, attribute
leakage, and collapse (RankMe)."""
from __future__ import annotations

from typing import Any

import numpy as np

from rafmedia.evaluate.metrics import frechet_distance, rankme
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


def latent_results(emb_ND: np.ndarray, rows: list[dict[str, Any]], attributes: list[str], *, seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {"rankme": rankme(emb_ND), "embed_dim": int(emb_ND.shape[1])}
    for attribute in attributes:
        groups = np.array([str(row[attribute]) for row in rows])
        out[attribute] = {"frechet": frechet_matrix(emb_ND, groups),
                          "leakage_auroc": attribute_leakage_auroc(emb_ND, groups, seed=seed)}
    return out
