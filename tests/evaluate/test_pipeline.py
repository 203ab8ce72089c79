"""One evaluation cell with every stage on: kNN and few-shot probes, an ordinal target, the pixel-level task with
plausibility and RCA, the projection and datasheet of the report. Each number is checked against an independent
computation on the same inputs, or against what it must be by construction."""
import json

import numpy as np
import pytest
import torch
from scipy import stats

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.config import EvaluateConfig, SegmentationConfig
from rafmedia.evaluate.runner import run_evaluation


@pytest.fixture(scope="module")
def report(small_cohort, tmp_path_factory):
    store, _ = small_cohort
    torch.manual_seed(0)
    weights = export_encoder(create_encoder("cnn3d_small", width=8, num_stages=2),  # 8^3 feature maps at 32^3
                             tmp_path_factory.mktemp("enc") / "encoder.safetensors", architecture="cnn3d_small",
                             options={"width": 8, "num_stages": 2}, card={"name": "fine"})
    config = EvaluateConfig(cohort=str(store.path), encoders=[str(weights)], random_baseline=False, seeds=[0, 1],
                            alterations=["gaussian_noise"], severities=[1, 3], bootstrap_resamples=50,
                            permutations=49, ordinal_targets=["severity"], min_group_size=4,
                            segmentation=SegmentationConfig(enabled=True, head_steps=120, rca_references=6))
    return run_evaluation(config, progress=False), store


def test_knn_few_shot_and_ordinal_probes_are_reported_per_replicate(report):
    result, _ = report
    probes = result["encoders"]["fine"]["probes"]
    assert len(probes["disease"]["knn"]["per_seed"]) == 2
    assert probes["disease"]["knn"]["auroc"]["mean"] == pytest.approx(np.mean(probes["disease"]["knn"]["per_seed"]))
    assert set(probes["disease"]["few_shot"]) == {"0.01", "0.1", "1.0"}
    # 100% of the labels is the primary logistic probe itself (same split, same C grid, same seed)
    full = probes["disease"]["few_shot"]["1.0"]["per_seed"]
    assert full == pytest.approx([seed["auroc"] for seed in probes["disease"]["per_seed"]], abs=1e-12)
    ordinal = probes["severity"]
    assert len(ordinal["per_seed"]) == 2 and -1 <= ordinal["quadratic_weighted_kappa"]["mean"] <= 1


def test_the_pixel_level_task_is_scored_consistently(report):
    result, store = report
    segmentation = result["encoders"]["fine"]["segmentation"]
    assert segmentation["structures"] == ["body", "heart", "liver", "kidney"]
    assert segmentation["per_structure"]["body"]["dice"] > 0.4  # all-background, the majority class, scores 0
    dice = np.array(segmentation["dice_per_subject"])
    n_test = len(dice)
    assert dice.mean() == pytest.approx(np.mean([v["dice"] for v in segmentation["per_structure"].values()]))
    sexes = np.array(result["cohort"]["subjects"]["sex"])
    by_sex = segmentation["fairness"]["sex"]["dice"]
    assert sum(group["n"] for group in by_sex["groups"].values()) == n_test
    plausibility = segmentation["plausibility"]
    assert sum(g["n"] for g in plausibility["by_group"]["site"].values()) == n_test
    assert 0 <= plausibility["topology_share"] <= 1
    rca = segmentation["rca"]
    assert rca["true_dice"] == pytest.approx(list(dice))
    assert rca["pearson"] == pytest.approx(stats.pearsonr(rca["estimated_dice"], rca["true_dice"])[0], abs=1e-9)
    assert set(rca["true_gap"]) == set(segmentation["fairness"]) and len(sexes) == len(store.subject_ids())


def test_the_report_carries_the_projection_datasheet_and_robustness_summary(report):
    result, store = report
    entry = result["encoders"]["fine"]
    num_subjects = len(store.subject_ids())
    assert len(entry["latent"]["projection"]["x"]) == num_subjects == len(result["cohort"]["subjects"]["site"])
    xy = np.array([entry["latent"]["projection"]["x"], entry["latent"]["projection"]["y"]])
    assert abs(np.corrcoef(xy)[0, 1]) < 1e-3  # principal components are uncorrelated
    counts = result["cohort"]["datasheet"]["subgroups"]["counts"]["site"]
    sites = result["cohort"]["subjects"]["site"]
    assert {site: value["count"] for site, value in counts.items()} == {s: sites.count(s) for s in set(sites)}
    assert "silhouette" in entry["latent"]["site"] and "knn_ood" in entry["latent"]
    for key in ("index", "performance", "robustness", "fairness"):
        low, high = entry["raf"][f"{key}_ci95"]
        assert low <= entry["raf"][key] <= high


def test_a_cell_rerun_with_the_embedding_cache_embeds_nothing_and_gives_the_same_numbers(small_cohort, tmp_path,
                                                                                      monkeypatch):
    from rafmedia.evaluate import embed
    from rafmedia.evaluate.cache import EmbeddingCache

    store, _ = small_cohort
    torch.manual_seed(1)
    weights = export_encoder(create_encoder("cnn3d_small", width=8), tmp_path / "encoder.safetensors",
                             architecture="cnn3d_small", options={"width": 8}, card={"name": "plain"})
    config = EvaluateConfig(cohort=str(store.path), encoders=[str(weights)], seeds=[0], alterations=["gaussian_noise"],
                            severities=[2], bootstrap_resamples=20, permutations=19, ordinal_targets=[])
    embedded = []
    real = embed.embed_subjects
    monkeypatch.setattr(embed, "embed_subjects", lambda *a, **k: embedded.append(len(a[2])) or real(*a, **k))
    cache = EmbeddingCache(tmp_path / "embeddings.zarr")
    first = run_evaluation(config, progress=False, cache=cache)
    num_subjects, num_test = len(store.subject_ids()), int(round(len(store.subject_ids()) * config.test_fraction))
    assert sorted(embedded) == sorted([num_subjects, num_subjects, num_test, num_test])  # clean + altered, 2 models
    embedded.clear()
    again = run_evaluation(config, progress=False, cache=cache)  # no results store: the cells are recomputed...
    assert embedded == []  # ...from cached embeddings only
    assert json.dumps(again["encoders"]) == json.dumps(first["encoders"])  # (NaN != NaN, so compare the text)


def test_without_alterations_the_index_is_the_mean_of_p_and_f_and_the_report_renders(small_cohort, tmp_path):
    from rafmedia.core.files import write_json
    from rafmedia.evaluate.report import render_report

    store, _ = small_cohort
    torch.manual_seed(2)
    weights = export_encoder(create_encoder("cnn3d_small", width=8), tmp_path / "encoder.safetensors",
                             architecture="cnn3d_small", options={"width": 8}, card={"name": "plain"})
    result = run_evaluation(EvaluateConfig(cohort=str(store.path), encoders=[str(weights)], seeds=[0], alterations=[],
                                           bootstrap_resamples=20, permutations=19), progress=False)
    for entry in result["encoders"].values():
        assert np.isnan(entry["raf"]["robustness"])
        assert entry["raf"]["index"] == pytest.approx((entry["raf"]["performance"] + entry["raf"]["fairness"]) / 2)
    write_json(tmp_path / "out" / "report.json", result)
    assert "RAF index" in render_report(tmp_path / "out").read_text()


def test_a_cohort_without_labels_is_scored_by_rca_from_a_labelled_reference_cohort(small_cohort, tmp_path):
    """The evaluated cohort has images only: the head trains on the reference cohort, RCA estimates every subject's
    Dice and the groups' estimated gap; nothing needs the evaluated cohort's labels."""
    from rafmedia.shards.store import CohortStore, StoreConfig

    reference, _ = small_cohort
    rows = reference.read_manifest()
    unlabelled = CohortStore.create(tmp_path / "unlabelled.zarr", config=StoreConfig(chunk_size=16), name="unlabelled")
    for row in rows:
        unlabelled.write_subject(row["subject_id"], channels={"image": reference.read(row["subject_id"])}, label=None,
                                 attrs={})
    unlabelled.write_manifest(rows)
    torch.manual_seed(0)
    weights = export_encoder(create_encoder("cnn3d_small", width=8, num_stages=2), tmp_path / "encoder.safetensors",
                             architecture="cnn3d_small", options={"width": 8, "num_stages": 2}, card={"name": "fine"})
    config = EvaluateConfig(cohort=str(unlabelled.path), encoders=[str(weights)], random_baseline=False, seeds=[0],
                            alterations=[], bootstrap_resamples=20, permutations=19, ordinal_targets=[],
                            segmentation=SegmentationConfig(enabled=True, head_steps=60, rca_references=4,
                                                            reference_cohort=str(reference.path)))
    segmentation = run_evaluation(config, progress=False)["encoders"]["fine"]["segmentation"]
    assert segmentation["labelled"] is False and "per_structure" not in segmentation
    estimated = np.array(segmentation["rca"]["estimated_dice"])
    assert len(estimated) == len(rows) and np.isfinite(estimated).all() and (0 <= estimated).all()
    sexes = np.array([row["sex"] for row in rows])
    means = {sex: estimated[sexes == sex].mean() for sex in ("F", "M")}
    assert segmentation["rca"]["estimated_gap"]["sex"] == pytest.approx(abs(means["F"] - means["M"]))
    assert segmentation["estimated_fairness"]["sex"]["dice"]["gap"] == pytest.approx(abs(means["F"] - means["M"]))
    missing = EvaluateConfig(**{**config.__dict__, "segmentation": SegmentationConfig(enabled=True)})
    with pytest.raises(UserError, match="needs label maps"):
        run_evaluation(missing, progress=False)
