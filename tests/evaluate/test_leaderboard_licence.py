"""Leaderboard rows carry the licence of each encoder's weights, read from its card, in every rendering."""
from __future__ import annotations

import csv
import io

import torch

from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.export import export_encoder
from rafmedia.evaluate.encoder_entries import RANDOM_SOURCE
from rafmedia.evaluate.leaderboard import leaderboard_rows, to_csv, to_html, to_markdown
from rafmedia.evaluate.results import CellKey, ResultsStore


def _cell(store: ResultsStore, name: str, source: str, index: float) -> None:
    result = {"raf": {"index": index, "index_ci95": [index - 0.1, index + 0.1], "performance": index,
                      "robustness": index, "fairness": index}, "headline": {}}
    store.put(CellKey(name, "cohort", "settings"), encoder=name, encoder_source=source, cohort="siteA",
              cohort_path="/data/siteA", seconds=1.0, result=result)


def test_rows_and_every_rendering_carry_the_weights_licence(tmp_path):
    torch.manual_seed(0)
    licensed = export_encoder(create_encoder("cnn3d_small", width=4), tmp_path / "a" / "encoder.safetensors",
                              architecture="cnn3d_small", options={"width": 4}, card={"licence": "CC-BY-NC-4.0"})
    old = export_encoder(create_encoder("cnn3d_small", width=4), tmp_path / "b" / "encoder.safetensors",
                         architecture="cnn3d_small", options={"width": 4}, card={})  # an export from before licences
    store = ResultsStore(tmp_path / "results.sqlite")
    _cell(store, "licensed", str(licensed), 0.9)
    _cell(store, "old card", str(old), 0.8)
    _cell(store, "timm", "timm:resnet18=weights.safetensors", 0.7)
    _cell(store, "random", RANDOM_SOURCE, 0.5)
    rows = leaderboard_rows([store.path])
    assert [(row["encoder"], row["licence"]) for row in rows] == [
        ("licensed", "CC-BY-NC-4.0"), ("old card", "unknown"), ("timm", "unknown"), ("random", "none (random weights)")]
    table = to_markdown(rows)
    assert "| licence |" in table.splitlines()[2] and "| CC-BY-NC-4.0 |" in table
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert [row["licence"] for row in parsed] == ["CC-BY-NC-4.0", "unknown", "unknown", "none (random weights)"]
    assert "<th>licence</th>" in to_html(rows) and "<td>CC-BY-NC-4.0</td>" in to_html(rows)
