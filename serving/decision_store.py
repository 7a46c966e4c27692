"""The decision log, the feedback on it and the bandits' posteriors, in one SQLite file shared by the server's workers.

``<home>/decisions/decisions.sqlite`` (WAL mode: readers never wait for the one writer):

- ``decisions``: one row per ``/personalize`` answer: its id, time, placement, the customer's *pseudonymized* key
  (never the id; null without consent), segment, variant, policy, experiment and arm, cold start, consent, scores;
- ``feedback``: at most one ``impression``, ``click`` and ``conversion`` per decision (a repeat is acknowledged and
  ignored, so a client's retry never counts twice); a click or conversion without an impression implies one;
- ``bandit``: per (placement, segment, variant) the trials (impressions) and successes (the catalog's reward event)
  of decisions the bandit made for consenting customers: the Beta posterior, kept across restarts.

Feedback and the bandit's counts change in one transaction, so they always reconcile: the counts equal what the
feedback rows of bandit decisions add up to (:meth:`DecisionStore.recount` checks it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pandas as pd

from personalize.errors import PersonalizeError

EVENTS = ("impression", "click", "conversion")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    decision_id TEXT PRIMARY KEY, ts TEXT NOT NULL, placement TEXT NOT NULL, customer_key TEXT, segment TEXT,
    bandit_segment TEXT, variant TEXT NOT NULL, policy TEXT NOT NULL, experiment TEXT, arm TEXT,
    cold_start INTEGER NOT NULL, consent INTEGER NOT NULL, scores TEXT);
CREATE INDEX IF NOT EXISTS decisions_customer ON decisions (customer_key);
CREATE INDEX IF NOT EXISTS decisions_experiment ON decisions (experiment, arm);
CREATE TABLE IF NOT EXISTS feedback (
    decision_id TEXT NOT NULL, event TEXT NOT NULL, ts TEXT NOT NULL, value REAL, implied INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (decision_id, event));
CREATE TABLE IF NOT EXISTS bandit (
    placement TEXT NOT NULL, segment TEXT NOT NULL, variant TEXT NOT NULL, trials INTEGER NOT NULL DEFAULT 0,
    successes INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (placement, segment, variant));
"""


class UnknownDecision(PersonalizeError):
    """Feedback for a decision id the log does not hold."""


class DecisionStore:
    """One SQLite file; a connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()

    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.executescript(_SCHEMA)
            self._local.con = con
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # --- writes -------------------------------------------------------------------------------------------------
    def record_decision(self, decision_id: str, ts: str, decision: dict[str, Any], customer_key: str | None,
                        segment: str | None, cold_start: bool, consent: bool,
                        scores: dict[str, Any] | None) -> None:
        self._con().execute(
            "INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (decision_id, ts, decision["placement"], customer_key, segment, decision.get("bandit_segment"),
             decision["variant"], decision["policy"], decision.get("experiment"), decision.get("arm"),
             int(cold_start), int(consent), None if scores is None else json.dumps(scores)))

    def record_feedback(self, decision_id: str, event: str, ts: str, value: float | None,
                        reward: str) -> dict[str, Any]:
        """Store one feedback event; returns what changed. A repeat of an event is ignored (``duplicate``)."""
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            row = con.execute("SELECT placement, bandit_segment, variant, consent FROM decisions WHERE "
                              "decision_id = ?", (decision_id,)).fetchone()
            if row is None:
                raise UnknownDecision(f"no decision {decision_id!r} in the decision log")
            placement, bandit_segment, variant, consent = row
            inserted = self._insert(con, decision_id, event, ts, value, implied=False)
            implied = False
            if event != "impression":
                implied = self._insert(con, decision_id, "impression", ts, None, implied=True)
            learns = bandit_segment is not None and bool(consent)
            trials = int(learns and (implied or (event == "impression" and inserted)))
            successes = int(learns and inserted and event == reward)
            if trials or successes:
                con.execute("INSERT INTO bandit VALUES (?, ?, ?, ?, ?) ON CONFLICT (placement, segment, variant) "
                            "DO UPDATE SET trials = trials + excluded.trials, "
                            "successes = successes + excluded.successes",
                            (placement, bandit_segment, variant, trials, successes))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return {"decision_id": decision_id, "event": event, "duplicate": not inserted, "implied_impression": implied,
                "bandit_updated": bool(trials or successes)}

    @staticmethod
    def _insert(con: sqlite3.Connection, decision_id: str, event: str, ts: str, value: float | None,
                implied: bool) -> bool:
        cur = con.execute("INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?)",
                          (decision_id, event, ts, value, int(implied)))
        return cur.rowcount == 1

    # --- reads --------------------------------------------------------------------------------------------------
    def bandit_stats(self, placement: str, segment: str) -> dict[str, tuple[int, int]]:
        rows = self._con().execute("SELECT variant, trials, successes FROM bandit WHERE placement = ? AND "
                                   "segment = ?", (placement, segment)).fetchall()
        return {v: (int(n), int(s)) for v, n, s in rows}

    def bandits(self) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM bandit ORDER BY placement, segment, variant", self._con())

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        cur = self._con().execute("SELECT * FROM decisions WHERE decision_id = ?", (decision_id,))
        row = cur.fetchone()
        return None if row is None else dict(zip([d[0] for d in cur.description], row))

    def experiment_frame(self, experiment: str) -> pd.DataFrame:
        """One row per decision of ``experiment``: its arm, variant, customer key, time, and whether an impression,
        click and conversion followed (with the conversion's value)."""
        return pd.read_sql_query(
            "SELECT d.decision_id, d.ts, d.customer_key, d.arm, d.variant, d.policy, d.segment, "
            "MAX(f.event = 'impression') AS impression, MAX(f.event = 'click') AS click, "
            "MAX(f.event = 'conversion') AS conversion, "
            "SUM(CASE WHEN f.event = 'conversion' THEN f.value END) AS value "
            "FROM decisions d LEFT JOIN feedback f ON f.decision_id = d.decision_id "
            "WHERE d.experiment = ? GROUP BY d.decision_id ORDER BY d.ts", self._con(), params=(experiment,)
        ).fillna({"impression": 0, "click": 0, "conversion": 0}).astype(
            {"impression": bool, "click": bool, "conversion": bool})

    def counts(self) -> dict[str, int]:
        con = self._con()
        out = {"decisions": con.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]}
        for event, n in con.execute("SELECT event, COUNT(*) FROM feedback GROUP BY event"):
            out[event] = n
        return out

    def recount(self, reward: str) -> pd.DataFrame:
        """The bandit counts recomputed from the feedback rows (what ``bandit`` must equal)."""
        return pd.read_sql_query(
            "SELECT d.placement, d.bandit_segment AS segment, d.variant, "
            "SUM(f.event = 'impression') AS trials, SUM(f.event = ?) AS successes "
            "FROM decisions d JOIN feedback f ON f.decision_id = d.decision_id "
            "WHERE d.bandit_segment IS NOT NULL AND d.consent = 1 "
            "GROUP BY d.placement, d.bandit_segment, d.variant ORDER BY 1, 2, 3", self._con(), params=(reward,))

    # --- erasure ------------------------------------------------------------------------------------------------
    def forget(self, customer_key: str, reward: str) -> dict[str, int]:
        """Remove every decision and feedback row of one customer and take their contribution out of the bandits'
        posteriors; returns the rows removed."""
        con = self._con()
        con.execute("BEGIN IMMEDIATE")
        try:
            contrib = con.execute(
                "SELECT d.placement, d.bandit_segment, d.variant, SUM(f.event = 'impression'), SUM(f.event = ?) "
                "FROM decisions d JOIN feedback f ON f.decision_id = d.decision_id WHERE d.customer_key = ? AND "
                "d.bandit_segment IS NOT NULL AND d.consent = 1 GROUP BY 1, 2, 3", (reward, customer_key)).fetchall()
            for placement, segment, variant, n, s in contrib:
                con.execute("UPDATE bandit SET trials = trials - ?, successes = successes - ? WHERE placement = ? "
                            "AND segment = ? AND variant = ?", (n or 0, s or 0, placement, segment, variant))
            feedback = con.execute("DELETE FROM feedback WHERE decision_id IN (SELECT decision_id FROM decisions "
                                   "WHERE customer_key = ?)", (customer_key,)).rowcount
            decisions = con.execute("DELETE FROM decisions WHERE customer_key = ?", (customer_key,)).rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return {"decisions": decisions, "feedback": feedback,
                "bandit_trials_removed": int(sum((n or 0) for *_, n, _ in contrib))}

    def holds(self, customer_key: str) -> int:
        """Rows that still name the customer (for the erasure check)."""
        return int(self._con().execute("SELECT COUNT(*) FROM decisions WHERE customer_key = ?",
                                       (customer_key,)).fetchone()[0])
