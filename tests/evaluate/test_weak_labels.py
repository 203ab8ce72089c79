"""The weak-label study: the attention-MIL probe on cases with a known answer, the voxel maps and localisation scores
against brute-force or scikit-learn references, the metrics against scikit-learn and scipy, and one whole
`raf evaluate` run on a tiny brain cohort (real store, real encoders, the report with its overlays)."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage, stats
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, mean_absolute_error, roc_auc_score

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.localisation import (mass_map, mean_map, pointing_chance, pointing_hit, pointing_point,
                                            voxel_auroc)
from rafmedia.evaluate.metrics import bootstrap_ci
from rafmedia.evaluate.mil import inflate_input_channels, late_fusion_bags
from rafmedia.evaluate.probes import PROBES, create_probe, list_probes
from rafmedia.evaluate.weak_labels import (CrossValidated, knn_anomaly, ordinal_values, paired_difference, scored,
                                           stratified_folds)
from rafmedia.launch.cli import main
from rafmedia.shards.store import StoreConfig
from rafmedia.shards.synth_brain import BrainCohortConfig, generate_brain_cohort


def bright_instance_bags(num_bags: int, seed: int, instances: int = 16, features: int = 6):
    """Bags of noise; a bag of grade g > 0 holds one instance whose first feature is raised by 3 g + 3 (6 to 12 standard deviations)."""
    rng = np.random.default_rng(seed)
    grades = np.arange(num_bags) % 4
    bags = rng.normal(size=(num_bags, instances, features))
    bright = rng.integers(0, instances, size=num_bags)
    bags[np.arange(num_bags), bright, 0] += np.where(grades > 0, 3.0 * grades + 3.0, 0)
    return bags, grades, bright


@pytest.fixture(scope="module")
def bright_probe():
    bags, grades, _ = bright_instance_bags(120, seed=0)
    return create_probe("attention_mil", num_classes=4, head="corn", epochs=200, weight_decay=1e-3, seed=0).fit(
        bags, grades)


def test_attention_mil_is_registered_with_the_probes():
    assert "attention_mil" in list_probes()
    assert PROBES.tags("attention_mil")["targets"] == "bags"
    with pytest.raises(UserError, match="ordinal head"):
        create_probe("attention_mil", head="softmax")


def test_the_attention_head_finds_the_single_bright_instance(bright_probe):
    bags, grades, bright = bright_instance_bags(60, seed=1)
    attention = bright_probe.attention(bags)
    np.testing.assert_allclose(attention.sum(axis=1), 1.0, atol=1e-6)
    positive = grades > 0
    found = np.mean(attention[positive].argmax(axis=1) == bright[positive])
    assert found >= 0.9  # chance: 1 / 16
    kappa = cohen_kappa_score(grades, bright_probe.predict(bags), weights="quadratic")
    assert kappa > 0.85
    # occluding the bright instance (replacing it by a grade-0 bag's mean) lowers the expected grade most
    reference = bags[grades == 0].mean(axis=0)
    drops = bright_probe.occlusion(bags[positive], reference)
    assert np.mean(drops.argmax(axis=1) == bright[positive]) >= 0.9


def test_curriculum_and_a_fixed_seed_give_reproducible_fits():
    bags, grades, _ = bright_instance_bags(40, seed=2)
    difficulty = np.abs(np.random.default_rng(0).normal(size=40))
    fits = [create_probe("attention_mil", epochs=20, curriculum=True, seed=3).fit(bags, grades, difficulty_N=difficulty)
            for _ in range(2)]
    np.testing.assert_array_equal(fits[0].scores(bags), fits[1].scores(bags))
    other = create_probe("attention_mil", epochs=20, curriculum=False, seed=3).fit(bags, grades)
    assert not np.array_equal(other.scores(bags), fits[0].scores(bags))


def test_late_fusion_standardises_each_channel_and_flags_the_missing_one():
    a = np.arange(2 * 3 * 2, dtype=float).reshape(2, 3, 2)
    b = np.full((2, 3, 1), 5.0) + np.arange(3)[None, :, None]
    bags = late_fusion_bags({"a": a, "b": b}, {"a": np.array([True, True]), "b": np.array([True, False])})
    assert bags.shape == (2, 3, 2 + 1 + 2)
    flat = a.reshape(-1, 2)
    np.testing.assert_allclose(bags[..., :2], (a - flat.mean(0)) / (flat.std(0) + 1e-6))
    np.testing.assert_allclose(bags[0, :, 2], (b[0, :, 0] - 6.0) / (np.std([5, 6, 7]) + 1e-6))
    np.testing.assert_array_equal(bags[1, :, 2], 0.0)  # subject 1 has no channel b
    np.testing.assert_array_equal(bags[:, :, 3:], [[[0, 0]] * 3, [[0, 1]] * 3])  # missing flags (a, b)


def test_an_inflated_encoder_sees_identical_stacked_channels_as_the_one_channel_input():
    torch.manual_seed(0)
    encoder = create_encoder("cnn3d_small", width=4, num_stages=2).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    inflated = inflate_input_channels(encoder, 3).eval()
    with torch.no_grad():
        torch.testing.assert_close(inflated(x.repeat(1, 3, 1, 1, 1)), encoder(x), atol=1e-5, rtol=1e-4)
    assert next(encoder.parameters()).shape[1] == 1  # the original is untouched
    with pytest.raises(UserError, match="one-channel"):
        inflate_input_channels(create_encoder("cnn3d_small", in_channels=2, width=4), 3)


def test_knn_anomaly_is_the_mean_distance_to_the_k_nearest_reference_patches_at_the_same_position():
    rng = np.random.default_rng(0)
    reference, test = rng.normal(size=(5, 4, 3)), rng.normal(size=(2, 4, 3))
    got = knn_anomaly(test, reference, k=2)
    flat = reference.reshape(-1, 3)
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    for m in range(2):
        for p in range(4):
            distances = sorted(np.linalg.norm((reference[r, p] - test[m, p]) / std) for r in range(5))
            assert got[m, p] == pytest.approx(np.mean(distances[:2]))
    del mean


def test_voxel_maps_match_a_brute_force_count_of_covering_patches():
    shape, patch = (6, 6, 6), 4
    locations = np.array([[a, b, c] for a in (0, 2) for b in (0, 2) for c in (0, 2)])
    values = np.arange(len(locations), dtype=float)
    got = mean_map(values, locations, patch, shape)
    for voxel in [(0, 0, 0), (3, 3, 3), (5, 1, 2), (2, 5, 5)]:
        covering = [v for v, loc in zip(values, locations) if all(l <= x < l + patch for l, x in zip(loc, voxel))]
        assert got[voxel] == pytest.approx(np.mean(covering))
    weights = np.random.default_rng(0).dirichlet(np.ones(len(locations)))
    mass = mass_map(weights, locations, patch, shape)
    assert mass.sum() == pytest.approx(1.0)
    assert mass[0, 0, 0] == pytest.approx(weights[0] / patch**3)  # one patch covers the corner


def test_pointing_game_chance_and_auroc_against_hand_and_sklearn_references():
    shape = (20, 20, 20)
    brain = np.zeros(shape, bool)
    brain[2:18, 2:18, 2:18] = True
    lesion = np.zeros(shape, bool)
    lesion[5:8, 5:8, 5:8] = True
    grid = np.indices(shape)
    towards = -np.sqrt(((grid - np.array([6, 6, 6])[:, None, None, None]) ** 2).sum(0))  # peak inside the lesion
    away = -np.sqrt(((grid - np.array([15, 15, 15])[:, None, None, None]) ** 2).sum(0))
    assert pointing_hit(towards, lesion, brain, tolerance=0) and not pointing_hit(away, lesion, brain, tolerance=2)
    # (15,15,15) is 8 sqrt(3) = 13.86 voxels from the lesion's nearest voxel (7,7,7)
    assert pointing_hit(away, lesion, brain, tolerance=14) and not pointing_hit(away, lesion, brain, tolerance=13.8)
    flat = np.ones(shape)  # every brain voxel ties: the one nearest the centroid of the brain
    np.testing.assert_array_equal(pointing_point(flat, brain), [9, 9, 9])
    near = np.zeros(shape, bool)
    for voxel in np.argwhere(brain):
        near[tuple(voxel)] = np.min(np.linalg.norm(np.argwhere(lesion) - voxel, axis=1)) <= 2
    assert pointing_chance(lesion, brain, 2) == pytest.approx(near.sum() / brain.sum())
    noisy = towards + np.random.default_rng(0).normal(scale=3, size=shape)
    assert voxel_auroc(noisy, lesion, brain) == pytest.approx(roc_auc_score(lesion[brain], noisy[brain]))
    assert voxel_auroc(ndimage.gaussian_filter(lesion.astype(float), 1), lesion, brain) > 0.99


def test_ordinal_metrics_match_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    predictions = np.clip(y + rng.integers(-1, 2, 60), 0, 3)
    scores = y + rng.normal(scale=0.8, size=60)
    values = ordinal_values(y, predictions, scores, 5)  # grade 4 exists on the scale but nobody has it
    assert values["qwk"] == pytest.approx(cohen_kappa_score(y, predictions, weights="quadratic", labels=range(5)))
    assert values["spearman"] == pytest.approx(stats.spearmanr(y, scores).statistic)
    assert values["mae"] == pytest.approx(mean_absolute_error(y, predictions))
    assert values["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, predictions))
    run = CrossValidated(predictions[None], scores[None], {})
    same = paired_difference(y, run, run, 5, metric="qwk", resamples=50, seed=0)
    assert same == {"mean": 0.0, "low": 0.0, "high": 0.0}
    summary = scored(y, run, 5, resamples=200, seed=3)  # one set of resamples for all metrics: as bootstrap_ci draws
    for metric in ("qwk", "mae"):
        low, high = bootstrap_ci(lambda idx, m=metric: ordinal_values(y[idx], predictions[idx], scores[idx], 5)[m],
                                 60, seed=3, num_resamples=200)
        assert (summary[metric]["low"], summary[metric]["high"]) == pytest.approx((low, high))


def test_stratified_folds_partition_the_patients_and_keep_every_grade_in_each_fold():
    grades = np.array([0] * 10 + [1] * 6 + [2] * 3 + [3] * 3)
    folds = stratified_folds(grades, 5, seed=0)
    assert len(folds) == 3  # lowered to the rarest grade's count
    np.testing.assert_array_equal(np.sort(np.concatenate([test for _, test in folds])), np.arange(len(grades)))
    assert all(set(grades[test]) == {0, 1, 2, 3} for _, test in folds)
    assert [list(t) for _, t in folds] != [list(t) for _, t in stratified_folds(grades, 5, seed=1)]


@pytest.fixture(scope="module")
def weak_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("weak")
    config = BrainCohortConfig(num_subjects=16, shape=[32, 32, 32], rater_noise=0.0, workers=1, lesion_radius=[2.0, 5.0],
                               missing={"t1": 0.0, "flair": 0.0, "pet": 0.25})
    store = generate_brain_cohort(config, store_config=StoreConfig(), out=root / "brain" / "cohort.zarr",
                                  progress=False)
    torch.manual_seed(0)
    weights = export_encoder(create_encoder("cnn3d_small", width=4, num_stages=2), root / "enc" / "encoder.safetensors",
                             architecture="cnn3d_small", options={"width": 4, "num_stages": 2}, card={"name": "tiny"})
    settings = ["evaluate.weak_labels.enabled=true", "evaluate.weak_labels.folds=2", "evaluate.weak_labels.seeds=[0]",
                "evaluate.weak_labels.epochs=15", "evaluate.weak_labels.heads=[corn,qwk]",
                "evaluate.weak_labels.noise_levels=[0.0,0.5]", "evaluate.weak_labels.bootstrap_resamples=30",
                "evaluate.weak_labels.overlays_per_grade=1", "evaluate.weak_labels.inner_folds=2"]
    out = root / "eval"
    code = main(["evaluate", "--cohort", str(store.path), "--encoder", str(weights), "--out", str(out), "--quiet",
                 *settings])
    return code, out, store


def test_raf_evaluate_runs_the_weak_label_study_and_reports_it(weak_run):
    code, out, store = weak_run
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "weak_labels" and set(report["encoders"]) == {"tiny", "random-init cnn3d_small"}
    study = report["encoders"]["tiny"]["weak_labels"]
    rows = store.read_manifest()
    assert study["grade_counts"] == {str(g): sum(int(r["grade"]) == g for r in rows) for g in range(4)}
    assert study["missing"] == {"t1": 0, "flair": 0, "pet": 4}
    assert study["num_instances"] == 27 and study["stride"] == 8  # 16^3 patches at half overlap in 32^3
    mil = study["probes"]["attention_mil"]
    assert mil["qwk"]["mean"] == pytest.approx(np.mean([s["qwk"] for s in mil["per_seed"]]))
    assert mil["qwk"]["low"] <= mil["qwk"]["mean"] <= mil["qwk"]["high"]
    ablations = study["ablations"]
    assert set(ablations["heads"]) == {"corn", "corn + smoothing 0.2", "qwk", "qwk + smoothing 0.2"}
    assert set(ablations["fusions"]) == {"late", "early", "channel:t1", "channel:flair", "channel:pet"}
    assert ablations["fusions"]["channel:pet"]["num_patients"] == 12
    assert ablations["noise_curve"][0]["flip_rate"] == 0.0
    assert 0.2 < ablations["noise_curve"][1]["flip_rate"] < 0.8
    assert "ablations" not in report["encoders"]["random-init cnn3d_small"]["weak_labels"]  # baseline: main only
    with_lesion = sum(int(r["grade_true"]) > 0 for r in rows)
    for kind in ("attention", "occlusion", "anomaly"):
        scores = study["localisation"][kind]
        assert 0 <= scores["pointing"]["rate"] <= 1 and 0 < scores["pointing"]["chance"] < 1
        by_grade = scores["pointing"]["by_grade"]
        assert sum(v["n"] for v in by_grade.values()) == with_lesion and "0" not in by_grade
        assert sum(v["rate"] * v["n"] for v in by_grade.values()) / with_lesion == pytest.approx(
            scores["pointing"]["rate"])
    assert study["localisation"]["num_patients"] == with_lesion
    overlay = study["overlays"][0]
    assert len(study["overlays"]) == 4 and np.asarray(overlay["lesion"]).shape == (32, 32)
    assert all(0 <= np.min(m) and np.max(m) <= 1 for m in overlay["maps"].values())  # scaled to [0, 1] per volume
    page = (out / "report.html").read_text()
    assert "Where the evidence is" in page and page.count("data:image/png") >= 5
    assert "MIL QWK" in (out / "leaderboard.csv").read_text()
