"""A persistent judgment cache in SQLite, keyed by (judge model, filled-in judge prompt).

The filled-in prompt holds the template, the question and the answer, so the key covers all four parts of
(judge model, prompt, question, answer). Each judgment is committed as soon as it arrives: a re-run costs no
calls, and a run interrupted half-way resumes with what it had.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path

from emalib.judge.scoring import Judgment


def judgment_key(judge_model: str, prompt: str) -> str:
    return hashlib.sha256(f"{judge_model}\x00{prompt}".encode()).hexdigest()


class JudgmentCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS judgments (key TEXT PRIMARY KEY, judge_model TEXT, score REAL, "
            "numeric_mass REAL, raw TEXT, created TEXT DEFAULT CURRENT_TIMESTAMP)")
        self._db.commit()

    def get(self, judge_model: str, prompt: str) -> Judgment | None:
        with self._lock:
            row = self._db.execute("SELECT score, numeric_mass, raw FROM judgments WHERE key = ?",
                                   (judgment_key(judge_model, prompt),)).fetchone()
        if row is None:
            return None
        return Judgment(score=row[0], numeric_mass=row[1], judge_model=judge_model, raw=json.loads(row[2]))

    def put(self, prompt: str, judgment: Judgment) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments (key, judge_model, score, numeric_mass, raw) VALUES (?, ?, ?, ?, ?)",
                (judgment_key(judgment.judge_model, prompt), judgment.judge_model, judgment.score,
                 judgment.numeric_mass, json.dumps(judgment.raw)))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        self._db.close()
