"""Ingest records the data's licences and sources from a listing's optional columns: per subject, and summed up in
the store's root attrs (what `raf pretrain` copies into the encoder's card)."""
from __future__ import annotations

import numpy as np

from rafmedia.shards.description import store_provenance, synthetic_provenance
from rafmedia.shards.ingest import IngestConfig, ingest
from rafmedia.shards.store import CohortStore, StoreConfig
from tests.shards.test_formats import write_nifti

ROWS = [("a0", "CC-BY-4.0", "OpenScans"), ("a1", "CC-BY-4.0", "OpenScans"), ("b0", "CC-BY-NC-4.0", "Clinic"),
        ("c0", "", "")]


def _ingest(tmp_path, header: str, rows: list[str]) -> CohortStore:
    for subject, *_ in ROWS:
        write_nifti(tmp_path / f"{subject}.nii.gz", np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4),
                    np.eye(4))
    listing = tmp_path / "scans.csv"
    listing.write_text("\n".join([header, *rows]) + "\n")
    summary = ingest(listing, tmp_path / "store", config=IngestConfig(workers=1),
                     store_config=StoreConfig(chunk_size=8), progress=False)
    assert summary.count("bad") == 0
    return CohortStore(summary.store)


def test_licence_and_source_columns_become_subject_and_store_provenance(tmp_path):
    store = _ingest(tmp_path, "subject_id,image,licence,source",
                    [f"{s},{s}.nii.gz,{licence},{source}" for s, licence, source in ROWS])
    assert store.subject_attrs("b0")["data_source"] == {"name": "Clinic", "licence": "CC-BY-NC-4.0"}
    # an empty cell: the listing's name as the source, and an unknown licence
    assert store.subject_attrs("c0")["data_source"] == {"name": "scans", "licence": "unknown"}
    provenance = store_provenance(store)
    assert sorted(provenance["sources"], key=lambda s: s["name"]) == [
        {"name": "Clinic", "licence": "CC-BY-NC-4.0", "subjects": 1},
        {"name": "OpenScans", "licence": "CC-BY-4.0", "subjects": 2},
        {"name": "scans", "licence": "unknown", "subjects": 1}]
    assert provenance["licence"] == "mixed: CC-BY-4.0, CC-BY-NC-4.0, unknown"


def test_the_american_spelling_and_a_dataset_column_are_read_too(tmp_path):
    store = _ingest(tmp_path, "subject_id,image,license,dataset", [f"{s},{s}.nii.gz,MIT,Public" for s, *_ in ROWS])
    assert store_provenance(store) == {"licence": "MIT", "sources": [{"name": "Public", "licence": "MIT",
                                                                       "subjects": 4}]}


def test_a_store_without_provenance_reads_as_unknown_and_synthetic_ones_as_cc0(tmp_path):
    store = CohortStore.create(tmp_path / "bare.zarr", config=StoreConfig(chunk_size=8), name="bare")
    assert store_provenance(store) == {"licence": "unknown", "sources": []}
    assert synthetic_provenance("rafmedia synthetic brain cohort", 3) == {
        "licence": "CC0-1.0", "sources": [{"name": "rafmedia synthetic brain cohort", "licence": "CC0-1.0",
                                           "subjects": 3}]}
