"""Cohort builder: no leakage, count-exact strata / OOD / challenging / imbalance, determinism, aggregation,
alterations re-applied at read time, spec errors that name the key, and the `raf cohort build` command."""
import copy
import json
from collections import Counter

import numpy as np
import pytest
import yaml

from rafmedia.core.errors import UserError
from rafmedia.launch.cli import main
from rafmedia.shards.cohort import build_cohort
from rafmedia.shards.cohort_reader import CohortSplit
from rafmedia.shards.cohort_spec import load_spec, spec_from_dict
from rafmedia.shards.datasheet import load_manifest
from rafmedia.shards.manifest import summary_row
from rafmedia.shards.splits import controlled_rounding, exact_counts
from rafmedia.shards.store import CohortStore, StoreConfig, read_rows_csv

SPLITS = {"train": 0.5, "public_test": 0.25, "hidden_test": 0.25}


def make_store(path, num_subjects, *, offset=0.0, seed=0, patients=None):
    """A real store of 8^3 subjects: image = offset + subject index (+ small noise); site/sex/patient metadata."""
    store = CohortStore.create(path, config=StoreConfig(chunk_size=8), name=path.name)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_subjects):
        image = (offset + index + rng.normal(0, 0.1, (8, 8, 8))).astype(np.float32)
        metadata = {"site": "abc"[index % 3], "sex": "FM"[(index // 3) % 2]}
        if patients is not None:
            metadata["patient"] = f"p{patients[index]:02d}"
        subject = f"sub-{index:04d}"
        store.write_subject(subject, channels={"image": image}, label=None, attrs={"metadata": metadata, "spacing": [1, 1, 1]})
        rows.append(summary_row(subject, metadata=metadata, channels={"image": image}, label=None, spacing=[1, 1, 1]))
    store.write_manifest(rows)
    return store


def spec_dict(store, **changes):
    data = {"name": "test", "seed": 0, "sources": [{"name": "synth", "store": str(store)}], "splits": dict(SPLITS),
            "stratify": ["site", "sex"]}
    data.update(changes)
    return data


def build(tmp_path, data, name="build", **options):
    out = build_cohort(spec_from_dict(copy.deepcopy(data)), out=tmp_path / name, datasheets=False, progress=False,
                       **options)
    splits = {split: read_rows_csv(out / "splits" / f"{split}.csv") for split in data["splits"]}
    return out, splits, json.loads((out / "cohort.json").read_text())


# ---- allocation primitive ------------------------------------------------------------------------
def test_exact_counts_are_the_largest_remainder_rounding():
    assert exact_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert exact_counts(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # quotas 3.5, 1.75, 1.75: the largest remainders round up
    assert exact_counts(2, [1, 1, 1]) == [1, 1, 0]  # equal remainders: the first ones round up
    assert sum(exact_counts(199, [0.2, 0.3, 0.5])) == 199


def test_controlled_rounding_keeps_strata_and_totals_on_random_tables():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sizes = rng.integers(0, 15, size=rng.integers(1, 10))
        fractions = rng.dirichlet(np.ones(rng.integers(2, 5)))
        table = controlled_rounding(sizes, fractions, rng)
        quotas = sizes[:, None] * fractions
        assert np.array_equal(table.sum(axis=1), sizes)
        assert np.all(table >= np.floor(quotas + 1e-9)) and np.all(table <= np.ceil(quotas - 1e-9))
        assert table.sum(axis=0).tolist() == exact_counts(int(sizes.sum()), fractions.tolist())


# ---- the splits ----------------------------------------------------------------------------------
def test_no_subject_or_group_in_two_splits_across_seeds(tmp_path):
    patients = [index // 3 if index < 24 else 8 + index % 5 for index in range(40)]  # 1 to 4 scans per patient
    store = make_store(tmp_path / "grouped.zarr", 40, patients=patients)
    manifest_ids = {row["subject_id"] for row in store.read_manifest()}
    for seed in range(4):
        _, splits, summary = build(tmp_path, spec_dict(store.path, seed=seed, group_by="patient"), name=f"s{seed}")
        uids = [row["uid"] for rows in splits.values() for row in rows]
        assert len(uids) == len(set(uids)) and set(uids) == manifest_ids  # disjoint, and nobody dropped silently
        patients_per_split = {split: {row["patient"] for row in rows} for split, rows in splits.items()}
        for first, second in [("train", "public_test"), ("train", "hidden_test"), ("public_test", "hidden_test")]:
            assert not patients_per_split[first] & patients_per_split[second]
        groups = Counter(patients)
        assert sum(len(p) for p in patients_per_split.values()) == len(groups)
        assert [summary["splits"][s]["num_groups"] for s in SPLITS] == [len(patients_per_split[s]) for s in SPLITS]


def test_stratification_is_count_exact_per_stratum(small_cohort, tmp_path):
    store, _ = small_cohort
    manifest = store.read_manifest()
    _, splits, summary = build(tmp_path, spec_dict(store.path, stratify=["site", "sex"]))
    assert [len(splits[s]) for s in SPLITS] == exact_counts(len(manifest), list(SPLITS.values())) == [18, 9, 9]
    strata = Counter((row["site"], row["sex"]) for row in manifest)
    for split, fraction in SPLITS.items():
        realised = Counter((row["site"], row["sex"]) for row in splits[split])
        for stratum, size in strata.items():  # each stratum's share is the overall one, to the unit
            assert np.floor(fraction * size) <= realised[stratum] <= np.ceil(fraction * size)
        assert summary["splits"][split]["strata"] == {" | ".join(k): v for k, v in sorted(realised.items())}


def test_held_out_site_is_never_in_train_and_the_reported_fraction_is_the_realised_one(small_cohort, tmp_path):
    store, _ = small_cohort
    ood = {"hold_out": {"site": ["site-c"]}, "splits": ["public_test", "hidden_test"]}
    _, splits, summary = build(tmp_path, spec_dict(store.path, out_of_distribution=ood), name="all")
    assert not [row for row in splits["train"] if row["site"] == "site-c" or row["ood"]]
    assert sum(row["site"] == "site-c" for split in ("public_test", "hidden_test") for row in splits[split]) == 12
    for split in ("public_test", "hidden_test"):
        realised = sum(row["ood"] for row in splits[split]) / len(splits[split])
        assert summary["splits"][split]["ood_fraction"] == realised
        assert all(row["ood"] == (row["site"] == "site-c") for row in splits[split])
    # A planted fraction: held-out cases make up 20% of each test split, the rest of site-c is left out.
    _, splits, summary = build(tmp_path, spec_dict(store.path, out_of_distribution={**ood, "fraction": 0.2}), name="f")
    inside = exact_counts(24, list(SPLITS.values()))  # sites a and b: [12, 6, 6]
    for split, num_inside in zip(("public_test", "hidden_test"), inside[1:]):
        num_ood = sum(row["ood"] for row in splits[split])
        assert num_ood == round(0.2 * num_inside / 0.8) == 2 and len(splits[split]) == num_inside + num_ood
        assert summary["splits"][split]["ood_fraction"] == num_ood / len(splits[split]) == 0.25
    assert summary["excluded"] == {"out_of_distribution.unused": 12 - 4}
    with pytest.raises(UserError, match="largest feasible fraction is about 0.500"):
        build(tmp_path, spec_dict(store.path, out_of_distribution={**ood, "fraction": 0.8}), name="x")


def test_challenging_cases_and_their_alterations_are_count_exact(small_cohort, tmp_path):
    store, _ = small_cohort
    alterations = [{"name": "gaussian_noise", "severity": 3, "weight": 2}, {"name": "bias_field", "severity": 2}]
    challenging = {"fraction": 0.3, "splits": ["public_test", "hidden_test"], "alterations": alterations}
    _, splits, summary = build(tmp_path, spec_dict(store.path, challenging=challenging))
    assert all(row["alteration"] == "none" and row["alteration_severity"] == 0 for row in splits["train"])
    seeds = []
    for split in ("public_test", "hidden_test"):
        altered = [row for row in splits[split] if row["alteration"] != "none"]
        expected = exact_counts(len(splits[split]), [0.3, 0.7])[0]  # 9 subjects: 2.7 -> 3
        assert len(altered) == expected == 3 == summary["planted"]["challenging"]["per_split"][split]["num_planted"]
        assert Counter((row["alteration"], row["alteration_severity"]) for row in altered) == \
            {("gaussian_noise", 3): 2, ("bias_field", 2): 1}  # exact_counts(3, [2, 1])
        assert summary["splits"][split]["alterations"] == {"bias_field@2": 1, "gaussian_noise@3": 2}
        seeds += [row["alteration_seed"] for row in altered]
    assert len(set(seeds)) == len(seeds)


def test_imbalance_ratio_is_realised_exactly_and_maximally(small_cohort, tmp_path):
    store, _ = small_cohort
    imbalance = {"split": "train", "attribute": "sex", "ratio": {"F": 1, "M": 4}}
    _, plain, _ = build(tmp_path, spec_dict(store.path), name="plain")
    _, splits, summary = build(tmp_path, spec_dict(store.path, imbalance=imbalance), name="imbalanced")
    before = Counter(row["sex"] for row in plain["train"])
    after = Counter(row["sex"] for row in splits["train"])
    scale = min(before["F"] // 1, before["M"] // 4)  # the largest subsample with exactly 1 F per 4 M
    assert after == {"F": scale, "M": 4 * scale} and scale > 0
    assert {row["uid"] for row in splits["train"]} <= {row["uid"] for row in plain["train"]}
    assert splits["public_test"] == plain["public_test"]  # other splits untouched
    assert summary["excluded"] == {"imbalance.0": sum(before.values()) - 5 * scale}


def test_same_seed_gives_identical_csvs_and_another_seed_differs(small_cohort, tmp_path):
    store, _ = small_cohort
    challenging = {"fraction": 0.25, "alterations": [{"name": "gaussian_noise"}]}
    data = spec_dict(store.path, challenging=challenging, out_of_distribution={"hold_out": {"site": ["site-c"]}})
    first, _, _ = build(tmp_path, data, name="a")
    again, _, _ = build(tmp_path, data, name="b")
    other, _, _ = build(tmp_path, {**data, "seed": 1}, name="c")
    for split in SPLITS:
        assert (first / "splits" / f"{split}.csv").read_bytes() == (again / "splits" / f"{split}.csv").read_bytes()
    assert any((first / "splits" / f"{s}.csv").read_bytes() != (other / "splits" / f"{s}.csv").read_bytes() for s in SPLITS)


def test_two_stores_with_colliding_ids_are_aggregated_under_unique_ids(tmp_path):
    first = make_store(tmp_path / "first.zarr", 12, offset=0.0)
    second = make_store(tmp_path / "second.zarr", 12, offset=100.0, seed=1)
    sources = [{"name": "one", "store": str(first.path)}, {"name": "two", "store": str(second.path), "where": {"sex": "F"}}]
    out, splits, summary = build(tmp_path, {**spec_dict(first.path), "sources": sources})
    rows = [row for split in splits.values() for row in split]
    assert len(rows) == 12 + 6 and len({row["uid"] for row in rows}) == 18
    assert all(row["uid"] == f"{row['source']}/{row['subject_id']}" for row in rows)
    assert summary["excluded"] == {"sources.two.where": 6}
    for split in SPLITS:  # each uid reads its own store: volumes of store two are offset by 100
        reader = CohortSplit(out, split)
        for entry in reader:
            expected = (100.0 if entry.source == "two" else 0.0) + int(entry.subject_id[-4:])
            assert float(reader.read(entry).mean()) == pytest.approx(expected, abs=0.05)


def test_select_keeps_matching_subjects_and_lists_the_rest_in_excluded_csv(small_cohort, tmp_path):
    store, _ = small_cohort
    manifest = store.read_manifest()
    out, splits, summary = build(tmp_path, spec_dict(store.path, select={"age": {"min": 40, "max": 70},
                                                                         "site": ["site-a", "site-b"]}))
    expected = {row["subject_id"] for row in manifest if 40 <= row["age"] <= 70 and row["site"] != "site-c"}
    assert {row["uid"] for rows in splits.values() for row in rows} == expected
    excluded = read_rows_csv(out / "excluded.csv")
    assert {row["uid"] for row in excluded} == {row["subject_id"] for row in manifest} - expected
    assert {row["reason"] for row in excluded} == {"select"}
    assert summary["dropped_by_select"]["age"] == sum(not 40 <= row["age"] <= 70 for row in manifest)


def test_an_altered_subject_reads_the_same_twice_and_carries_the_planted_noise(small_cohort, tmp_path):
    store, _ = small_cohort
    challenging = {"fraction": 1.0, "splits": ["public_test"], "alterations": [{"name": "gaussian_noise", "severity": 4}]}
    out, _, _ = build(tmp_path, spec_dict(store.path, challenging=challenging))
    split = CohortSplit(out, "public_test")
    assert len(split) == 9 and all(entry.alteration == "gaussian_noise" for entry in split)
    for entry in list(split)[:3]:
        clean = store.read(entry.subject_id).astype(np.float64)
        altered = split.read(entry)
        assert np.array_equal(altered, split.read(entry))
        # gaussian_noise severity 4 adds noise of std 0.50 x the volume's intensity std
        difference = altered - clean
        assert difference.std() == pytest.approx(0.50 * clean.std(), rel=0.03)
        assert abs(difference.mean()) < 0.01 * clean.std()
        region = (slice(2, 10), slice(0, 32), slice(5, 9))
        assert np.array_equal(split.read(entry, region=region), altered[region])
    # The datasheet of a split CSV samples voxels through the same alteration.
    rows, read_sample, title, default_out = load_manifest(out / "splits" / "public_test.csv", channel="image", stride=4)
    assert (title, default_out) == ("public_test", out / "splits" / "datasheet-public_test")
    first = split[0]
    assert np.array_equal(read_sample(rows[0]), split.read(first)[::4, ::4, ::4])
    assert not np.array_equal(read_sample(rows[0]), store.read(first.subject_id)[::4, ::4, ::4])
    clean_entry = next(iter(CohortSplit(out, "train")))
    assert clean_entry.alteration is None
    assert np.array_equal(CohortSplit(out, "train").read(clean_entry), store.read(clean_entry.subject_id))
    with pytest.raises(UserError, match="split 'public' is not in .*did you mean 'public_test'"):
        CohortSplit(out, "public")


# ---- spec errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"stratfy": ["site"]}, "unknown key 'stratfy'; did you mean 'stratify'"),
    ({"splits": {"train": 0.6, "test": 0.3}}, "key 'splits': fractions must sum to 1, got 0.9 (train=0.6, test=0.3)"),
    ({"challenging": {"fraction": 0.2, "alterations": [{"name": "gausian_noise"}]}},
     "key 'challenging.alterations.0.name': unknown alteration 'gausian_noise'; did you mean 'gaussian_noise'"),
    ({"challenging": {"fration": 0.2}}, "unknown key 'challenging.fration'; did you mean 'challenging.fraction'"),
    ({"challenging": {"fraction": 0.2, "alterations": [{"name": "bias_field", "severity": 7}]}}, "must be 1 to 5, got 7"),
    ({"out_of_distribution": {"hold_out": {"site": ["site-c"]}, "splits": ["hiden_test"]}},
     "unknown split 'hiden_test'; did you mean 'hidden_test'"),
    ({"out_of_distribution": {"hold_out": {"site": ["site-c"]}, "splits": ["train"]}}, "never go to 'train'"),
    ({"imbalance": {"attribute": "sex", "ratio": {"F": 1.5, "M": 3}}}, "key 'imbalance.0.ratio.F' must be a whole number"),
    ({"seed": "zero"}, "key 'seed' must be a whole number, got 'zero'"),
])
def test_spec_errors_name_the_key(change, message):
    data = {"name": "t", "sources": [{"name": "s", "store": "x"}], "splits": dict(SPLITS), **change}
    with pytest.raises(UserError) as error:
        spec_from_dict(data)
    assert message in str(error.value)


@pytest.mark.parametrize("change, message", [
    ({"out_of_distribution": {"hold_out": {"site": ["sitec"]}}},
     "key 'out_of_distribution.hold_out.site': value 'sitec' of 'site' is not in the data; did you mean 'site-c'?"),
    ({"stratify": ["site", "sexe"]}, "key 'stratify.1': unknown attribute 'sexe'; did you mean 'sex'"),
    ({"select": {"sex": ["female"]}}, "value 'female' of 'sex' is not in the data"),
    ({"imbalance": {"attribute": "sex", "ratio": {"F": 1, "N": 2}}}, "value 'N' of 'sex' is not in the data"),
    ({"imbalance": {"attribute": "sex", "ratio": {"F": 1}}}, "also has sex = M; give each a ratio"),
])
def test_spec_errors_that_need_the_data_name_the_key_and_the_closest_value(small_cohort, tmp_path, change, message):
    store, _ = small_cohort
    with pytest.raises(UserError) as error:
        build(tmp_path, spec_dict(store.path, **change))
    assert message in str(error.value)


def test_an_existing_different_build_is_not_replaced_without_overwrite(small_cohort, tmp_path):
    store, _ = small_cohort
    build(tmp_path, spec_dict(store.path))
    build(tmp_path, spec_dict(store.path))  # the same spec again: allowed, same result
    with pytest.raises(UserError, match="holds a different cohort build \\(changed: seed\\); pass --overwrite"):
        build(tmp_path, spec_dict(store.path, seed=4))
    _, _, summary = build(tmp_path, spec_dict(store.path, seed=4), overwrite=True)
    assert summary["seed"] == 4
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a cohort build"):
        build(tmp_path, spec_dict(store.path), name="other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ---- the command ----------------------------------------------------------------------------------
def test_packaged_example_spec_is_valid():
    spec = load_spec("example")
    assert spec.name == "synth-raf-v1" and spec.challenging.fraction == 0.25
    assert spec.out_of_distribution.hold_out == {"site": ["site-c"]}


def test_cli_builds_splits_and_a_datasheet_per_split(small_cohort, tmp_path, capsys):
    store, _ = small_cohort
    data = spec_dict(store.path, out_of_distribution={"hold_out": {"site": ["site-c"]}},
                     challenging={"fraction": 0.25, "alterations": [{"name": "bias_field", "severity": 2}]})
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "built"
    assert main(["cohort", "build", str(tmp_path / "spec.yaml"), "--out", str(out), "--quiet"]) == 0
    assert f"cohort: {out} (train 12 (0 OOD, 0 altered)" in capsys.readouterr().out
    assert (out / "resolved_spec.yaml").is_file() and yaml.safe_load((out / "resolved_spec.yaml").read_text())["seed"] == 0
    for split in SPLITS:
        rows = read_rows_csv(out / "splits" / f"{split}.csv")
        sheet = json.loads((out / "datasheets" / split / "datasheet.json").read_text())
        assert sheet["num_subjects"] == len(rows)
        assert sheet["subgroups"]["counts"]["site"] == {
            site: {"count": n, "fraction": n / len(rows)} for site, n in sorted(Counter(r["site"] for r in rows).items())}
        assert (out / "datasheets" / split / "datasheet.html").read_text().count("data:image/png;base64,") >= 4
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**data, "splits": {"train": 0.7, "test": 0.2}}, sort_keys=False))
    assert main(["cohort", "build", str(bad), "--out", str(tmp_path / "bad")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "bad.yaml': key 'splits': fractions must sum to 1, got 0.9" in error
    with pytest.raises(SystemExit):
        main(["cohort", "build", "--help"])
    assert "usage: raf cohort build" in capsys.readouterr().out
