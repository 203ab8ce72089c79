"""Leaderboard arithmetic against hand-computed cases: rank intervals over shared bootstrap draws, tie groups from
overlapping intervals, best entry per participant, CSV that a spreadsheet cannot run."""
from __future__ import annotations

import numpy as np

from rafmedia.portal.leaderboard import leaderboard, rank_intervals, tie_groups, to_csv


def test_rank_intervals_count_how_many_entries_beat_each_in_every_draw():
    # 3 entries x 4 draws; ranks per draw: A 1,1,2,1  B 2,2,1,3  C 3,3,3,2
    draws = np.array([[0.9, 0.8, 0.5, 0.7], [0.6, 0.6, 0.9, 0.2], [0.1, 0.2, 0.3, 0.4]])
    # over 100 draws A loses first place once (1%): inside the 95% interval's tails, outside the 100% one
    many = np.tile(np.array([[0.9], [0.5]]), (1, 100))
    many[1, 0] = 0.95
    assert rank_intervals(many).tolist() == [[1, 1], [2, 2]]
    assert rank_intervals(many, level=1.0).tolist() == [[1, 2], [1, 2]]
    assert rank_intervals(draws, level=1.0).tolist() == [[1, 2], [1, 3], [2, 3]]  # every draw
    tied = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert rank_intervals(tied).tolist() == [[1, 1], [1, 1]]  # equal values share the best rank
    assert rank_intervals(np.array([[np.nan, 0.1], [0.2, 0.2]]), level=1.0).tolist() == [[2, 2], [1, 1]]


def test_ties_follow_the_group_leaders_interval():
    intervals = [[0.7, 0.9], [0.65, 0.75], [0.6, 0.68], [0.2, 0.3], [0.25, 0.35]]
    # B overlaps A -> tied with A; C does not overlap A (0.68 < 0.7) -> new group, D new, E overlaps D
    assert tie_groups([0.8, 0.7, 0.64, 0.25, 0.3], intervals) == [0, 0, 2, 3, 3]


def entry(participant, name, index, ci, draws, created):
    return {"participant": participant, "name": name, "submission": name, "created_at": created,
            "score": {"index": index, "index_ci95": ci, "performance": index, "robustness": None, "fairness": 0.5,
                      "draws": {"index": draws}}}


def test_leaderboard_rows_best_entry_per_participant_ranks_and_ties():
    entries = [entry("ann", "a1", 0.60, [0.5, 0.7], [0.6, 0.55, 0.65], 1), entry("ann", "a2", 0.80, [0.75, 0.85],
               [0.8, 0.78, 0.82], 2), entry("bo", "b1", 0.70, [0.6, 0.8], [0.7, 0.8, 0.6], 3),
               entry("cy", "c1", 0.30, [0.2, 0.4], [0.3, 0.2, 0.4], 4)]
    rows = leaderboard(entries)
    assert [r["name"] for r in rows] == ["a2", "b1", "c1"]  # ann's best only
    assert [r["rank_label"] for r in rows] == ["=1", "=1", "3"]  # b1's interval overlaps a2's
    assert rows[0]["rank_ci95"] == [1, 2] and rows[1]["rank_ci95"] == [1, 2] and rows[2]["rank_ci95"] == [3, 3]
    every = leaderboard(entries, best_only=False)
    assert [r["name"] for r in every] == ["a2", "b1", "a1", "c1"]


def test_csv_neutralises_formulas():
    rows = leaderboard([entry("ann", "=HYPERLINK(\"http://x\")", 0.5, [0.4, 0.6], [0.5], 1)])
    text = to_csv(rows)
    assert "'=HYPERLINK" in text and text.splitlines()[0].startswith("rank,tied,rank_low,rank_high")
