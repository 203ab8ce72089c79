"""Datasheet: counts against collections.Counter, rare/missing/quality against hand-built manifests, figures
that decode, and per-site voxel histograms that show the planted noisy site."""
import base64
import io
import json
import re
from collections import Counter
from itertools import product

import numpy as np
import pytest

from rafmedia.core.errors import UserError
from rafmedia.launch.cli import main
from rafmedia.shards.datasheet import DatasheetConfig, compute_datasheet, load_manifest, write_datasheet
from rafmedia.shards.manifest import QUALITY_FLAGS, summary_row
from rafmedia.shards.store import CohortStore, StoreConfig

# A hand-made manifest of 20 subjects: sites 10/6/3/1, sex with 3 empty cells, age with 2 (one overlapping),
# anisotropic spacing for 5 subjects and a constant volume for 2.
SITES = ["a"] * 10 + ["b"] * 6 + ["c"] * 3 + ["d"]
SEX = ["F", "M", "", "M", "F", "", "M", "M", "F", "M", "F", "M", "", "M", "F", "M", "M", "F", "M", "F"]
AGE = [30, 41, 52, "", 64, 35, 47, 58, 61, 33, 44, 56, "", 38, 49, 50, 66, 62, 71, 29]


@pytest.fixture(scope="module")
def hand_store(tmp_path_factory):
    """A real store of 20 subjects at 8^3 (ramp + small noise: no quality flag except small_fov and the planted ones)."""
    store = CohortStore.create(tmp_path_factory.mktemp("hand") / "cohort.zarr", config=StoreConfig(chunk_size=8), name="hand")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(20):
        image = np.broadcast_to(np.linspace(0, 1, 8, dtype=np.float32), (8, 8, 8)) + rng.normal(0, 0.01, (8, 8, 8))
        if index in (4, 9):
            image = np.full((8, 8, 8), 2.0)
        image = image.astype(np.float32)
        spacing = [1.0, 1.0, 4.0] if index % 4 == 0 else [1.0, 1.0, 1.0]
        subject = f"s{index:02d}"
        metadata = {"site": SITES[index], "sex": SEX[index], "age": AGE[index]}
        store.write_subject(subject, channels={"image": image}, label=None, attrs={"metadata": metadata, "spacing": spacing})
        rows.append(summary_row(subject, metadata=metadata, channels={"image": image}, label=None, spacing=spacing))
    store.write_manifest(rows)
    return store


def test_counts_per_subgroup_and_intersection_equal_counter(small_cohort):
    store, _ = small_cohort
    rows = store.read_manifest()
    sheet = compute_datasheet(rows, config=DatasheetConfig(), title="t", read_sample=None, progress=False)
    # Categorical metadata: text or small-cardinality ints; age and enlargement are floats, so they are numeric.
    assert sheet["attributes"] == ["site", "scanner", "sex", "disease", "severity", "lesions"]
    assert set(sheet["numeric"]) == {"age", "enlargement"}
    for attribute in sheet["attributes"]:
        expected = Counter(str(row[attribute]) for row in rows)
        assert {v: c["count"] for v, c in sheet["subgroups"]["counts"][attribute].items()} == expected
    pair = next(t for t in sheet["intersections"] if t["attributes"] == ["site", "sex"])
    expected = Counter((row["site"], row["sex"]) for row in rows)
    cells = {(c["values"]["site"], c["values"]["sex"]): c["count"] for c in pair["cells"]}
    assert cells == {key: expected.get(key, 0) for key in product(["site-a", "site-b", "site-c"], ["F", "M"])}
    scanner_site = next(t for t in sheet["intersections"] if t["attributes"] == ["site", "scanner"])
    assert len(scanner_site["empty"]) == 6  # one scanner per site: 6 of the 9 site x scanner cells are empty
    everything = next(t for t in sheet["intersections"] if len(t["attributes"]) == 6)
    assert sum(c["count"] for c in everything["cells"]) == len(rows)
    assert Counter({tuple(c["values"].values()): c["count"] for c in everything["cells"]}) == \
        Counter(tuple(str(row[a]) for a in sheet["attributes"]) for row in rows)


@pytest.mark.parametrize("rare_below, rare", [(0.16, ["c", "d"]), (0.15, ["d"]), (0.051, ["d"]), (0.05, [])])
def test_rare_categories_are_exactly_those_below_the_threshold(hand_store, rare_below, rare):
    rows = hand_store.read_manifest()  # site shares 0.50 / 0.30 / 0.15 / 0.05: the threshold is strict
    sheet = compute_datasheet(rows, config=DatasheetConfig(rare_below=rare_below), title="t", read_sample=None,
                              progress=False)
    assert sheet["subgroups"]["rare"]["site"] == rare


def test_missing_metadata_and_quality_prevalence_from_a_manifest_with_empty_cells(hand_store, tmp_path):
    rows, read_sample, _, default_out = load_manifest(hand_store.path, channel="image", stride=2)
    assert default_out == hand_store.path / "datasheet"
    write_datasheet(rows, out=tmp_path, config=DatasheetConfig(), title="hand", read_sample=read_sample, progress=False)
    sheet = json.loads((tmp_path / "datasheet.json").read_text())
    missing = sheet["missing"]["per_column"]
    assert (missing["sex"]["count"], missing["age"]["count"], missing["site"]["count"]) == (3, 2, 0)
    assert sheet["missing"]["num_subjects_with_missing"] == 4  # sex missing for 2, 5, 12; age for 3, 12
    assert sheet["missing"]["num_subjects_with_missing"] == sum(s == "" or a == "" for s, a in zip(SEX, AGE))
    assert {v: c["count"] for v, c in sheet["subgroups"]["counts"]["sex"].items()} == {"F": 7, "M": 10}
    flags = sheet["quality"]["flags"]
    counted = Counter(flag for row in rows for flag in str(row["flags"]).split(";") if flag)
    assert {name: entry["count"] for name, entry in flags.items()} == {name: counted.get(name, 0) for name in QUALITY_FLAGS}
    # Planted: every subject is 8^3 (small_fov), every 4th anisotropic (1 x 1 x 4 mm), subjects 4 and 9 constant.
    assert (flags["small_fov"]["count"], flags["anisotropic"]["count"], flags["constant"]["count"]) == (20, 5, 2)
    assert flags["anisotropic"]["fraction"] == pytest.approx(0.25)
    assert sheet["geometry"]["spacing_2"]["values"] == {"1.0": 15, "4.0": 5}
    assert sheet["numeric"]["age"]["count"] == 18


def test_html_embeds_decodable_figures_and_shows_the_json_numbers(small_cohort, tmp_path):
    import matplotlib.image

    store, _ = small_cohort
    rows, read_sample, title, _ = load_manifest(store.path, channel="image", stride=4)
    html_path = write_datasheet(rows, out=tmp_path, config=DatasheetConfig(), title=title, read_sample=read_sample,
                                progress=False)
    page = html_path.read_text()
    sheet = json.loads((tmp_path / "datasheet.json").read_text())
    images = re.findall(r'<img alt="([a-z]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {alt for alt, _ in images} == {"categories", "intersection", "geometry", "intensity", "quality"}
    for _, data in images:
        png = base64.b64decode(data)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(io.BytesIO(png)).shape
        assert height > 100 and width > 100
    for attribute, values in sheet["subgroups"]["counts"].items():
        for value, entry in values.items():
            assert f"<td>{attribute}</td><td>{value}</td><td>{entry['count']}</td><td>{entry['fraction']:.3f}</td>" in page
    for group, entry in sheet["intensity"]["groups"].items():
        assert f"<td>{group}</td><td>{entry['num_subjects']}</td><td>{entry['num_voxels']}</td>" in page
    markdown = (tmp_path / "datasheet.md").read_text()
    assert "| site | site-a | 12 | 0.333 |  |" in markdown and (tmp_path / "figures" / "intensity.png").is_file()


def test_per_site_intensity_histogram_shows_the_noisy_site(small_cohort):
    """site-c was generated with 6x the noise of site-a: its voxel histogram is wider and its air peak lower."""
    store, _ = small_cohort
    rows, read_sample, _, _ = load_manifest(store.path, channel="image", stride=4)
    sheet = compute_datasheet(rows, config=DatasheetConfig(), title="t", read_sample=read_sample, progress=False)
    intensity = sheet["intensity"]
    groups = intensity["groups"]
    assert intensity["group_by"] == "site" and {g["num_subjects"] for g in groups.values()} == {12}
    edges = np.asarray(intensity["edges"])
    for site, entry in groups.items():  # independent reference: full reads strided by numpy
        voxels = np.concatenate([store.read(row["subject_id"])[::4, ::4, ::4].ravel() for row in rows if row["site"] == site])
        assert entry["num_voxels"] == voxels.size == 12 * 8**3
        assert entry["std"] == pytest.approx(float(voxels.std()), rel=1e-6)
        assert np.sum(np.asarray(entry["density"]) * np.diff(edges)) == pytest.approx(1.0)
    assert groups["site-a"]["std"] < groups["site-b"]["std"] < groups["site-c"]["std"]
    air_bin = int(np.searchsorted(edges, 0.0)) - 1  # background voxels are 0 + site noise
    assert groups["site-a"]["density"][air_bin] > 3 * groups["site-c"]["density"][air_bin]


@pytest.mark.parametrize("config, message", [
    (DatasheetConfig(attributes=["sexe"]), "--attributes: 'sexe' is not a manifest column; did you mean 'sex'"),
    (DatasheetConfig(intensity_by="scaner"),
     "--intensity-by: 'scaner' is not a manifest column; did you mean 'scanner'"),
])
def test_unknown_columns_are_user_errors_with_did_you_mean(small_cohort, config, message):
    store, _ = small_cohort
    with pytest.raises(UserError) as error:
        compute_datasheet(store.read_manifest(), config=config, title="t", read_sample=None, progress=False)
    assert message in str(error.value)


def test_cli_writes_the_datasheet_and_reports_errors_in_one_line(small_cohort, tmp_path, capsys):
    store, _ = small_cohort
    code = main(["shards", "datasheet", str(store.path), "--attributes", "site,sex", "--rare-below", "0.1",
                 "--out", str(tmp_path / "ds"), "--quiet"])
    assert code == 0 and f"datasheet: {tmp_path / 'ds'}" in capsys.readouterr().out
    sheet = json.loads((tmp_path / "ds" / "datasheet.json").read_text())
    assert sheet["attributes"] == ["site", "sex"] and sheet["rare_below"] == 0.1
    assert [t["attributes"] for t in sheet["intersections"]] == [["site", "sex"]]
    assert main(["shards", "datasheet", str(tmp_path / "nowhere")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0]
    assert main(["shards", "datasheet", str(store.path), "--rare-below", "5"]) == 2
    assert "--rare-below must be a fraction in (0, 1), got 5.0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "datasheet", "--help"])
    helped = capsys.readouterr().out
    assert exit_info.value.code == 0 and "usage: raf shards datasheet" in helped and "examples:" in helped


def test_html_escapes_every_category_exactly_once(tmp_path):
    """A category that looks like markup ("<unknown>", "a & b") is shown as text, escaped once (not twice)."""
    rows = [{"subject_id": f"s{i}", "scanner": ["<unknown>", "a & b"][i % 2]} for i in range(6)]
    html_path = write_datasheet(rows, out=tmp_path, config=DatasheetConfig(attributes=["scanner"]), title="t",
                                read_sample=None, progress=False)
    page = html_path.read_text()
    assert "<td>&lt;unknown&gt;</td>" in page and "<td>a &amp; b</td>" in page
    assert "&amp;lt;" not in page and "&amp;amp;" not in page and "<td><unknown>" not in page
