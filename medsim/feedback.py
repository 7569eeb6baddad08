"""Relevance feedback: 👍 / 👎 votes on the hits of a query, kept in the index's catalog, and Rocchio refinement.

Votes live in their own ``feedback`` table of ``catalog.sqlite``, written through a connection of their own, so a
vote never takes the index's writer lock (``build-index`` and ``watch`` keep writing cases meanwhile; SQLite orders
the transactions) and never changes what a served snapshot depends on (:meth:`medsim.index.CaseIndex.state_key`).
One row per (user, query, hit, model): a new vote replaces that user's earlier one, ``none`` withdraws it; the
history of every vote is in the server's audit log. The table is created by the first vote; an index without it
simply has no votes.

Refinement (Rocchio 1971, on the L2-normalised embeddings)::

    q' = alpha * q + beta * mean(👍 hits) - gamma * mean(👎 hits),   then L2-normalised

with the parameters of :data:`ROCCHIO` (the only place they are set). A hit counts as 👍 or 👎 by the sign of the
sum of its users' votes for the query (a tie does not count).
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medsim.errors import MedsimError
from medsim.index import CATALOG

VOTES = {"up": 1, "down": -1}  # what a client sends -> what the table stores; "none" withdraws a vote
WITHDRAW = "none"
BUSY_TIMEOUT_S = 5.0  # how long a vote waits for a build-index transaction to commit

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY,
    voted_at REAL NOT NULL,
    user TEXT NOT NULL,
    query_sop_uid TEXT NOT NULL,
    hit_sop_uid TEXT NOT NULL,
    vote INTEGER NOT NULL CHECK (vote IN (-1, 1)),
    score REAL,
    model_fingerprint TEXT NOT NULL,
    UNIQUE (user, query_sop_uid, hit_sop_uid, model_fingerprint)
);
CREATE INDEX IF NOT EXISTS feedback_query ON feedback (query_sop_uid);
"""
COLUMNS = ("voted_at", "user", "query_sop_uid", "hit_sop_uid", "vote", "score", "model_fingerprint")


class FeedbackError(MedsimError):
    """Votes cannot be stored or read: the catalog is read-only (``read_only``), or busy beyond the wait."""

    def __init__(self, message: str, read_only: bool = False):
        super().__init__(message)
        self.read_only = read_only


@dataclass(frozen=True)
class Vote:
    voted_at: float  # seconds since the epoch (UTC)
    user: str
    query_sop_uid: str
    hit_sop_uid: str
    vote: int  # +1 (👍) or -1 (👎)
    score: float | None  # the hit's cosine to the query when the vote was cast
    model_fingerprint: str

    def to_dict(self) -> dict:
        return {**asdict(self), "vote": "up" if self.vote > 0 else "down"}


class FeedbackStore:
    """The votes of the index at ``index_path``. Each call opens its own short connection: safe from any thread."""

    def __init__(self, index_path: str | Path):
        self.catalog = Path(index_path) / CATALOG

    def _connect(self, writable: bool) -> sqlite3.Connection:
        if not self.catalog.is_file():
            raise FeedbackError(f"no catalog at {self.catalog.parent.name}: not a medsim index")
        uri = "file:" + urllib.parse.quote(os.fsencode(self.catalog)) + ("?mode=rw" if writable else "?mode=ro")
        db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
        db.row_factory = sqlite3.Row
        return db

    def vote(self, *, user: str, query_sop_uid: str, hit_sop_uid: str, vote: str, score: float | None,
             model_fingerprint: str, at: float | None = None) -> Vote | None:
        """Store (or with ``vote="none"`` withdraw) ``user``'s vote; returns the stored vote (None when withdrawn).
        Raises FeedbackError when the catalog cannot be written."""
        if vote != WITHDRAW and vote not in VOTES:
            raise ValueError(f"vote must be one of {sorted(VOTES) + [WITHDRAW]}, got {vote!r}")
        row = Vote(time.time() if at is None else float(at), user, query_sop_uid, hit_sop_uid, VOTES.get(vote, 0),
                   None if score is None else float(score), model_fingerprint)
        try:
            with closing(self._connect(writable=True)) as db, db:
                db.executescript(SCHEMA)
                if vote == WITHDRAW:
                    db.execute("DELETE FROM feedback WHERE user=? AND query_sop_uid=? AND hit_sop_uid=? AND "
                               "model_fingerprint=?", (user, query_sop_uid, hit_sop_uid, model_fingerprint))
                    return None
                db.execute(f"INSERT INTO feedback ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                           "ON CONFLICT (user, query_sop_uid, hit_sop_uid, model_fingerprint) DO UPDATE SET "
                           "voted_at=excluded.voted_at, vote=excluded.vote, score=excluded.score",
                           tuple(getattr(row, c) for c in COLUMNS))
        except sqlite3.OperationalError as exc:
            if "readonly" in str(exc) or "read-only" in str(exc) or "unable to open" in str(exc):
                raise FeedbackError("the index's catalog is read-only here: votes cannot be stored",
                                    read_only=True) from None
            raise FeedbackError(f"the vote could not be stored now ({exc}); try again") from None
        return row

    def votes(self, query_sop_uid: str | None = None, model_fingerprint: str | None = None) -> list[Vote]:
        """The current votes (of one query and/or model), oldest first; none when the index has no votes table."""
        where, args = [], []
        for column, value in (("query_sop_uid", query_sop_uid), ("model_fingerprint", model_fingerprint)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        try:
            with closing(self._connect(writable=False)) as db:
                if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='feedback'").fetchone() is None:
                    return []
                rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM feedback"
                                  f"{' WHERE ' + ' AND '.join(where) if where else ''} ORDER BY voted_at, id",
                                  args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise FeedbackError(f"the votes could not be read ({exc})") from None
        return [Vote(*tuple(r)) for r in rows]


# ---- CSV (``medsim feedback export``, ``medsim train --feedback``) -----------------------------------------------

CSV_COLUMNS = ("voted_at", "user", "query_sop_uid", "hit_sop_uid", "vote", "score", "model_fingerprint")


def write_csv(votes: Iterable[Vote], path: str | Path) -> int:
    """Write the votes as CSV (``voted_at`` in ISO 8601 UTC, ``vote`` up/down); returns how many. Nothing beyond
    what the catalog shows: UIDs, the voter's client name, the score and the model."""
    import csv
    from datetime import datetime, timezone

    count = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for v in votes:
            writer.writerow([datetime.fromtimestamp(v.voted_at, timezone.utc).isoformat(timespec="microseconds"),
                             v.user, v.query_sop_uid, v.hit_sop_uid, "up" if v.vote > 0 else "down",
                             "" if v.score is None else repr(v.score), v.model_fingerprint])
            count += 1
    return count


def read_csv(path: str | Path) -> list[Vote]:
    """The votes of a CSV that :func:`write_csv` wrote; FeedbackError naming the line of anything else."""
    import csv
    from datetime import datetime

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = sorted(set(CSV_COLUMNS) - set(reader.fieldnames or ()))
            if missing:
                raise FeedbackError(f"{path}: not a feedback export (missing column(s) {', '.join(missing)}); write "
                                    "one with `medsim feedback export`")
            votes = []
            for line, row in enumerate(reader, 2):
                try:
                    if row["vote"] not in VOTES:
                        raise ValueError(f"vote {row['vote']!r} is not up or down")
                    votes.append(Vote(datetime.fromisoformat(row["voted_at"]).timestamp(), row["user"],
                                      row["query_sop_uid"], row["hit_sop_uid"], VOTES[row["vote"]],
                                      float(row["score"]) if row["score"] else None, row["model_fingerprint"]))
                except (TypeError, ValueError) as exc:
                    raise FeedbackError(f"{path}, line {line}: {exc}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FeedbackError(f"cannot read feedback file {path} ({exc})") from None
    return votes


# ---- refinement ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rocchio:
    """q' = alpha q + beta mean(positives) - gamma mean(negatives), L2-normalised."""

    alpha: float = 1.0
    beta: float = 0.75
    gamma: float = 0.25

    def refine(self, query: np.ndarray, positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
        q = self.alpha * np.asarray(query, dtype=np.float32)
        if len(positives):
            q = q + self.beta * np.asarray(positives, dtype=np.float32).mean(axis=0)
        if len(negatives):
            q = q - self.gamma * np.asarray(negatives, dtype=np.float32).mean(axis=0)
        norm = float(np.linalg.norm(q))
        return (q / norm if norm > 0 else np.asarray(query, dtype=np.float32)).astype(np.float32)


ROCCHIO = Rocchio()  # the refinement parameters (medsim serve, docs/api.md)


def net_votes(votes: Iterable[Vote]) -> tuple[list[str], list[str]]:
    """(👍 hits, 👎 hits): each hit by the sign of the sum of its votes; ties are left out."""
    totals: dict[str, int] = {}
    for v in votes:
        totals[v.hit_sop_uid] = totals.get(v.hit_sop_uid, 0) + v.vote
    return ([sop for sop, t in totals.items() if t > 0], [sop for sop, t in totals.items() if t < 0])


@dataclass(frozen=True)
class Refinement:
    vector: np.ndarray
    up: int  # 👍 hits used
    down: int  # 👎 hits used
    skipped: int  # voted hits whose vectors the index no longer holds

    def to_dict(self, rocchio: Rocchio = ROCCHIO) -> dict:
        return {"up": self.up, "down": self.down, "skipped": self.skipped, **asdict(rocchio)}


def refine(query: np.ndarray, votes: Iterable[Vote], vector_of: Callable[[str], np.ndarray | None],
           rocchio: Rocchio = ROCCHIO) -> Refinement:
    """The query vector moved by the votes (``vector_of``: a hit's stored vector, None when not indexed)."""
    positive, negative = net_votes(votes)
    found = {sop: vector_of(sop) for sop in positive + negative}
    pos = [found[s] for s in positive if found[s] is not None]
    neg = [found[s] for s in negative if found[s] is not None]
    dim = len(query)
    vector = rocchio.refine(query, np.asarray(pos, np.float32).reshape(-1, dim),
                            np.asarray(neg, np.float32).reshape(-1, dim))
    return Refinement(vector, len(pos), len(neg), sum(v is None for v in found.values()))
