"""Reverse classification accuracy against known truth: Dice vs MONAI, gaps vs fairlearn, neighbours vs scipy, and
RCA estimates vs the true Dice of predictions damaged by a planted, sex-dependent amount."""
import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial.distance import cdist

from rafmedia.core.errors import UserError
from rafmedia.evaluate.rca import (aggregate_reference_dice, corrupt_label_map, create_reverse_classifier,
                                   dice_per_structure, estimate_dice, estimate_dice_by_neighbours, estimated_gap,
                                   list_reverse_classifiers, nearest_references)
from rafmedia.shards.synth import LABELS
from rafmedia.shards.volumes import load_volumes

ORGANS = {name: LABELS[name] for name in ("heart", "liver", "kidney")}
NUM_REFERENCES, NUM_TEST = 6, 18
SEVERITY = {"M": (0.0, 0.6), "F": (0.4, 1.0)}  # planted: predictions for F are damaged more
PERFECT_FLOOR = {"voxel_classifier": 0.8, "atlas_forwarding": 0.6}  # case-mean estimate for a perfect pseudo-label


@pytest.fixture(scope="module")
def split(small_cohort):
    """(images, labels, sexes) of 6 reference and 18 test subjects of the shared 32^3 cohort."""
    store, _ = small_cohort
    ids = store.subject_ids()[: NUM_REFERENCES + NUM_TEST]
    images = load_volumes(store, ids, normalize=True, progress=False)[:, 0].numpy()
    labels = np.stack([store.read_label(subject) for subject in ids])
    sex_of = {row["subject_id"]: row["sex"] for row in store.read_manifest()}
    return images, labels, np.array([sex_of[subject] for subject in ids])


def test_dice_matches_monai_and_metrics_reloaded_edge_cases():
    from monai.metrics import compute_dice

    rng = np.random.default_rng(0)
    values = [1, 2, 3]
    for _ in range(5):
        prediction, reference = rng.integers(0, 4, (2, 12, 10, 8))
        one_hot = [torch.from_numpy(np.stack([x == v for v in values]))[None] for x in (prediction, reference)]
        expected = compute_dice(*one_hot, include_background=True).numpy()[0]
        np.testing.assert_allclose(dice_per_structure(prediction, reference, values), expected, rtol=1e-6)
    reference = np.zeros((4, 4, 4), int)
    reference[:2] = 1  # 32 voxels of label 1; label 2 absent
    prediction = np.zeros_like(reference)
    prediction[:1] = 1  # 16 voxels, all inside: 2 * 16 / (16 + 32)
    prediction[3, 0, 0] = 3  # label 3: predicted, absent from the reference
    dice = dice_per_structure(prediction, reference, [1, 2, 3])
    assert dice[0] == pytest.approx(2 / 3) and np.isnan(dice[1]) and dice[2] == 0.0
    assert dice_per_structure(np.zeros_like(reference), reference, [1])[0] == 0.0  # empty prediction: worst case


def test_aggregates_over_references_hand_computed():
    dice_RS = np.array([[0.2, 0.4, np.nan], [np.nan, 0.1, np.nan], [0.9, np.nan, np.nan]])
    np.testing.assert_allclose(aggregate_reference_dice(dice_RS), [0.9, 0.4, np.nan])
    np.testing.assert_allclose(aggregate_reference_dice(dice_RS, aggregate="top_k_mean", top_k=2), [0.55, 0.25, np.nan])
    np.testing.assert_allclose(aggregate_reference_dice(dice_RS, aggregate="top_k_mean", top_k=5), [0.55, 0.25, np.nan])
    with pytest.raises(UserError, match="aggregate"):
        aggregate_reference_dice(dice_RS, aggregate="median")


@pytest.mark.parametrize("method", list_reverse_classifiers())
def test_reverse_classifier_scores_perfect_high_and_empty_or_random_low(split, method):
    images, labels, _ = split
    reference_images, reference_labels = images[:NUM_REFERENCES], labels[:NUM_REFERENCES]
    test_images, truth = images[NUM_REFERENCES:NUM_REFERENCES + 3], labels[NUM_REFERENCES:NUM_REFERENCES + 3]
    rng = np.random.default_rng(1)
    pseudo_labels = {"perfect": truth, "empty": np.zeros_like(truth),
                     "random": rng.integers(0, 6, truth.shape).astype(truth.dtype)}
    estimate = {name: estimate_dice(test_images, labels_, reference_images, reference_labels, structures=ORGANS,
                                    method=method, seed=0) for name, labels_ in pseudo_labels.items()}
    assert estimate["perfect"].shape == (3, len(ORGANS))
    # Atlas forwarding carries the test anatomy over unchanged, so even a perfect label is capped by how well two
    # subjects overlap; the voxel classifier re-segments the reference and gets closer to 1.
    assert np.all(estimate["perfect"].mean(axis=1) > PERFECT_FLOOR[method])
    assert np.all(estimate["perfect"] - estimate["random"] > 0.4)
    np.testing.assert_array_equal(estimate["empty"], 0.0)  # every reference contains every organ
    assert np.all(estimate["random"] < 0.25)


@pytest.mark.parametrize("method", ["voxel_classifier", "atlas_forwarding"])
def test_rca_tracks_true_dice_and_the_planted_gap(split, method):
    images, labels, sexes = split
    test = slice(NUM_REFERENCES, None)
    rng = np.random.default_rng(4)
    predictions = np.stack([corrupt_label_map(label, severity=rng.uniform(*SEVERITY[sex]), rng=rng,
                                              structures=list(ORGANS.values()))
                            for label, sex in zip(labels[test], sexes[test])])
    true_N = np.stack([dice_per_structure(p, g, list(ORGANS.values())) for p, g in zip(predictions, labels[test])])
    true_N = true_N.mean(axis=1)
    estimate_NS = estimate_dice(images[test], predictions, images[:NUM_REFERENCES], labels[:NUM_REFERENCES],
                                structures=ORGANS, method=method, seed=0)
    assert stats.pearsonr(estimate_NS.mean(axis=1), true_N)[0] >= 0.7
    true_gap, estimated = estimated_gap(true_N, sexes[test]), estimated_gap(estimate_NS.mean(axis=1), sexes[test])
    assert true_gap["worst_group"] == "F" and estimated["worst_group"] == "F"  # same sign of M - F
    assert estimated["gap"] > 0.25 * true_gap["gap"]  # RCA shrinks the range of Dice, but not to nothing


def test_estimated_gap_matches_fairlearn_and_flags_undefined_cases():
    from fairlearn.metrics import MetricFrame

    rng = np.random.default_rng(2)
    values, groups = rng.uniform(0.3, 0.9, 30), rng.choice(["site-a", "site-b", "site-c"], 30)
    frame = MetricFrame(metrics=lambda y_true, y_pred: float(np.mean(y_pred)), y_true=np.zeros(30), y_pred=values,
                        sensitive_features=groups)
    summary = estimated_gap(values, groups)
    assert summary["gap"] == pytest.approx(frame.difference(method="between_groups"))
    assert summary["worst_group"] == frame.by_group.idxmin()
    assert summary["group_means"] == pytest.approx(frame.by_group.to_dict())
    flagged = estimated_gap(np.array([0.5, np.nan, 0.7, 0.2]), np.array(["F", "F", "M", "M"]))
    assert flagged["group_means"] == {"F": 0.5, "M": pytest.approx(0.45)}
    assert flagged["num_undefined"] == {"F": 1, "M": 0}
    with pytest.raises(UserError, match="mean\\(axis=1\\)"):
        estimated_gap(np.zeros((4, 3)), np.array(["F", "F", "M", "M"]))


def test_nearest_references_match_brute_force_cosine():
    rng = np.random.default_rng(3)
    test_emb, reference_emb = rng.normal(size=(7, 5)) + 2.0, rng.normal(size=(9, 5)) + 2.0
    center = reference_emb.mean(axis=0)
    expected = np.argsort(cdist(test_emb - center, reference_emb - center, metric="cosine"), axis=1)[:, :3]
    np.testing.assert_array_equal(np.sort(nearest_references(test_emb, reference_emb, 3), axis=1),
                                  np.sort(expected, axis=1))
    with pytest.raises(UserError, match="num_neighbours"):
        nearest_references(test_emb, reference_emb, 10)


def test_neighbour_estimator_uses_only_the_nearest_references(split):
    images, labels, _ = split
    test, reference = slice(NUM_REFERENCES, NUM_REFERENCES + 5), slice(0, NUM_REFERENCES)
    embeddings = torch.nn.functional.adaptive_avg_pool3d(torch.from_numpy(images)[:, None], 4).flatten(1).numpy()
    predictions = labels[test]
    kwargs = dict(structures=ORGANS, seed=0, test_emb_ND=embeddings[test], reference_emb_MD=embeddings[reference])
    # All references as neighbours: the plain estimator, draw for draw.
    every = estimate_dice_by_neighbours(images[test], predictions, images[reference], labels[reference],
                                        num_neighbours=NUM_REFERENCES, **kwargs)
    np.testing.assert_allclose(every, estimate_dice(images[test], predictions, images[reference], labels[reference],
                                                    structures=ORGANS, seed=0))
    # Two neighbours (atlas forwarding is deterministic): the max over exactly the two nearest references.
    two = estimate_dice_by_neighbours(images[test], predictions, images[reference], labels[reference],
                                      num_neighbours=2, method="atlas_forwarding", **kwargs)
    center = embeddings[reference].mean(axis=0)
    distance = cdist(embeddings[test] - center, embeddings[reference] - center, metric="cosine")
    for index, order in enumerate(np.argsort(distance, axis=1)):
        single = [estimate_dice(images[test][index:index + 1], predictions[index:index + 1], images[reference][[r]],
                                labels[reference][[r]], structures=ORGANS, method="atlas_forwarding", seed=0)[0]
                  for r in order[:2]]
        np.testing.assert_allclose(two[index], np.max(single, axis=0))


def test_corrupt_label_map_is_identity_at_zero_and_worsens_with_severity(split):
    _, labels, _ = split
    label, values = labels[0], list(ORGANS.values())
    np.testing.assert_array_equal(corrupt_label_map(label, severity=0.0, structures=values,
                                                    rng=np.random.default_rng(0)), label)
    rng = np.random.default_rng(5)
    mean_dice = {s: np.mean([np.nanmean(dice_per_structure(corrupt_label_map(label, severity=s, structures=values,
                                                                             rng=rng), label, values))
                             for _ in range(8)]) for s in (0.2, 1.0)}
    assert 1.0 > mean_dice[0.2] > mean_dice[1.0]
    with pytest.raises(UserError, match="severity"):
        corrupt_label_map(label, severity=1.5, structures=values, rng=rng)


def test_user_errors_name_the_bad_value(split):
    images, labels, _ = split
    with pytest.raises(UserError, match="did you mean 'voxel_classifier'"):
        create_reverse_classifier("voxel_clasifier")
    with pytest.raises(UserError, match="same shape"):
        estimate_dice(images[:2], labels[:3], images[2:4], labels[2:4], structures=ORGANS, seed=0)
    with pytest.raises(UserError, match=r"label value\(s\) \[9\]"):
        estimate_dice(images[:2], labels[:2], images[2:4], labels[2:4], structures=[2, 9], seed=0)
    with pytest.raises(UserError, match="structures is empty"):
        estimate_dice(images[:2], labels[:2], images[2:4], labels[2:4], structures=[], seed=0)
    with pytest.raises(UserError, match="top_k"):
        estimate_dice(images[:2], labels[:2], images[2:4], labels[2:4], structures=ORGANS, seed=0, top_k=0)
