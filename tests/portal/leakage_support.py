"""An adaptive attack on hidden labels through a phase's released scores (tests/portal/test_leakage.py).

A team of accounts submits label guesses to a phase of a real (SQLite) portal database for D days: every
submission passes `submissions.check_can_submit` (the per-user and per-team daily limits), and is recorded by
`submissions.finish`, which releases it exactly as the worker's scores are (`leaderboard.release`); the attacker
then reads what a participant sees of it (`leaderboard.visible_score`). Without the guards the attacker reads the
exact score, as the portal showed it before releases existed. The score is the accuracy of the guess on the hidden
labels with a percentile-bootstrap 95% interval over the same resampled subjects for every guess (numpy, checked
against scikit-learn's `accuracy_score` by the test: a thousand calls of it would take most of the test's time).

Attacks (Blum and Hardt, 2015, section 3.1 and the adaptive variant any attacker would try):
- `Boosting`: random guesses; keep those seen scoring above chance; majority vote of the kept ones.
- `Probing`: one random base guess, then the base with one label flipped per submission: a better score says the
  flipped label was wrong in the base, a worse one that it was right.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import sessionmaker

from rafmedia.portal import leaderboard, submissions
from rafmedia.portal.db import Challenge, Phase, Submission, User, open_database

CHANCE = 0.5
DAY_GAP_S = submissions.DAY_S + 3600  # one "day" of the attack to the next: yesterday's submissions no longer count


@dataclass
class Guards:
    """A phase's settings under attack; `exact`: the attacker reads exact scores (the portal before releases)."""

    daily_limit: int
    team_daily_limit: int
    ladder: bool
    exact: bool


class HiddenLabels:
    """n hidden binary labels and the score of a guess: accuracy with its bootstrap interval and draws."""

    def __init__(self, rng: np.random.Generator, num_labels: int, num_draws: int):
        self.labels = rng.integers(0, 2, num_labels)
        self.resamples = rng.integers(0, num_labels, (num_draws, num_labels))  # shared by every guess

    def score(self, guess: np.ndarray) -> dict:
        correct = guess == self.labels
        draws = correct[self.resamples].mean(axis=1)
        low, high = np.quantile(draws, [0.025, 0.975])
        return {"index": float(correct.mean()), "index_ci95": [float(low), float(high)],
                "draws": {"index": draws.tolist()}}


class Arena:
    """One phase, one team of `num_members` accounts, in a real portal database."""

    def __init__(self, sessions: sessionmaker, guards: Guards, *, num_members: int, team: str = "attackers"):
        self.sessions, self.guards = sessions, guards
        with self.sessions.begin() as db:
            challenge = Challenge(slug=f"c-{uuid.uuid4().hex[:6]}", title="attack")
            db.add(challenge)
            db.flush()
            phase = Phase(challenge_id=challenge.id, name="final", split="hidden_test", daily_limit=guards.daily_limit,
                          team_daily_limit=guards.team_daily_limit, ladder=guards.ladder)
            members = [User(name=f"{team}-{uuid.uuid4().hex[:6]}", password_hash="-", team=team)
                       for _ in range(num_members)]
            db.add_all([phase, *members])
            db.flush()
            self.phase_id, self.member_ids = phase.id, [m.id for m in members]

    def submit(self, member: int, score: dict, now: float) -> tuple[str, dict] | None:
        """What the member sees of `score` submitted at `now`: (kind, numbers); None when a limit refuses it."""
        token = f"attack:{uuid.uuid4().hex[:8]}"
        with self.sessions.begin() as db:
            user, phase = db.get(User, self.member_ids[member]), db.get(Phase, self.phase_id)
            try:
                submissions.check_can_submit(db, user, phase, now)
            except submissions.LimitReached:
                return None
            row = Submission(public_id=uuid.uuid4().hex[:24], user_id=user.id, phase_id=phase.id, name="guess",
                             folder="-", status="running", lease_owner=token, lease_expires=time.time() + 600,
                             created_at=now, protocol_version=phase.protocol_version)
            db.add(row)
            db.flush()
            submission_id = row.id
        if self.guards.exact:  # the portal before releases: participants saw the exact score
            return "exact", score
        assert submissions.finish(self.sessions, submission_id, token, score=score, log="")
        with self.sessions() as db:
            kept = db.get(Submission, submission_id)
            released = json.loads(kept.released_json)
            kind, numbers, _ = leaderboard.visible_score(kept.score, released, exact=False, private=False,
                                                         revealed=False)
        return kind, numbers


class Boosting:
    """Blum and Hardt's boosting attack: random guesses, majority vote of those seen above chance."""

    def __init__(self, rng: np.random.Generator, num_labels: int):
        self.rng, self.num_labels = rng, num_labels
        self.kept: list[np.ndarray] = []

    def next_guess(self) -> np.ndarray:
        return self.rng.integers(0, 2, self.num_labels)

    def observe(self, guess: np.ndarray, kind: str, numbers: dict) -> None:
        value = numbers.get("index") if kind in ("exact", "rounded") else None
        if value is not None and value > CHANCE:
            self.kept.append(guess)

    def labels(self) -> np.ndarray:
        if not self.kept:
            return self.rng.integers(0, 2, self.num_labels)
        votes = np.mean(self.kept, axis=0)
        return np.where(votes == 0.5, self.rng.integers(0, 2, self.num_labels), votes > 0.5).astype(int)


class Probing:
    """The adaptive attack: a base guess, then one label flipped per submission, read from the score's change."""

    def __init__(self, rng: np.random.Generator, num_labels: int):
        self.base = rng.integers(0, 2, num_labels)
        self.recovered = self.base.copy()
        self.base_value: float | None = None
        self.next_label = -1  # -1: the base itself goes first

    def next_guess(self) -> np.ndarray:
        guess = self.base.copy()
        if 0 <= self.next_label < len(guess):
            guess[self.next_label] ^= 1
        return guess

    def observe(self, guess: np.ndarray, kind: str, numbers: dict) -> None:
        value = numbers.get("index") if kind in ("exact", "rounded") else None
        label, self.next_label = self.next_label, self.next_label + 1
        if label < 0:
            self.base_value = value
        elif label < len(self.base) and value is not None and self.base_value is not None and value != self.base_value:
            self.recovered[label] = 1 - self.base[label] if value > self.base_value else self.base[label]

    def labels(self) -> np.ndarray:
        return self.recovered


ATTACKS = {"boosting": Boosting, "probing": Probing}


def run_attack(sessions: sessionmaker, attack: str, guards: Guards, *, seed: int, num_labels: int, num_draws: int,
               days: int, num_members: int) -> dict:
    """Runs one attack in a new phase of the database for `days` (each day every member submits until a limit
    refuses); the accuracy of the labels it recovers, how many submissions were accepted and how many scores seen."""
    rng = np.random.default_rng(seed)
    hidden = HiddenLabels(rng, num_labels, num_draws)
    arena = Arena(sessions, guards, num_members=num_members)
    attacker = ATTACKS[attack](np.random.default_rng([seed, 1]), num_labels)
    start, accepted, seen = time.time(), 0, 0
    for day in range(days):
        for member in range(num_members):
            for attempt in range(guards.daily_limit):
                guess = attacker.next_guess()
                shown = arena.submit(member, hidden.score(guess), start + day * DAY_GAP_S + member * 100 + attempt)
                if shown is None:
                    break
                accepted += 1
                seen += shown[0] in ("exact", "rounded")
                attacker.observe(guess, *shown)
            if shown is None and attempt == 0:  # the team's limit: the other members would be refused too
                break
    accuracy = float(np.mean(attacker.labels() == hidden.labels))
    return {"accuracy": accuracy, "accepted": accepted, "seen": seen}


ARMS = {"none (per-user limits, exact scores)": Guards(daily_limit=5, team_daily_limit=0, ladder=False, exact=True),
        "rounding only": Guards(daily_limit=5, team_daily_limit=0, ladder=False, exact=False),
        "team limit only": Guards(daily_limit=5, team_daily_limit=5, ladder=False, exact=True),
        "Ladder (and rounding)": Guards(daily_limit=5, team_daily_limit=0, ladder=True, exact=False),
        "all: team limit, rounding, Ladder": Guards(daily_limit=5, team_daily_limit=5, ladder=True, exact=False)}


def main(seeds: range = range(6)) -> None:
    """The table of docs/portal.md: every guard alone and together, both attacks, means over `seeds` (a few
    minutes): `python -m tests.portal.leakage_support`."""
    sessions = open_database("sqlite://")
    print(f"| guards | attack | recovered label accuracy (mean, min-max over {len(seeds)} seeds) | submissions | "
          "scores seen |\n| --- | --- | --- | --- | --- |")
    for arm, guards in ARMS.items():
        for attack in ATTACKS:
            runs = [run_attack(sessions, attack, guards, seed=seed, num_labels=200, num_draws=100, days=20,
                               num_members=5) for seed in seeds]
            accuracy = [run["accuracy"] for run in runs]
            print(f"| {arm} | {attack} | {np.mean(accuracy):.3f} ({min(accuracy):.3f}-{max(accuracy):.3f}) | "
                  f"{runs[0]['accepted']} | {np.mean([run['seen'] for run in runs]):.1f} |", flush=True)


if __name__ == "__main__":
    main()
