"""A persistent judgment cache in SQLite, keyed by (judge model, scoring mode, filled-in judge prompt).

The filled-in prompt holds the template, the question and the answer, so the key covers (judge model, mode,
prompt, question, answer). The mode is the judge's `cache_mode` ("logprobs", "number_probabilities", or
"sampled:n=..,t=.."): a sampled score and a logprob score of the same prompt are different judgments. The
logprob mode's key is the one caches had before modes existed, so those caches stay valid. Each judgment is committed as soon as it arrives: a re-run costs no
calls, and a run interrupted half-way resumes with what it had.

Only finite scores and masses are stored (SQLite keeps NaN as NULL, which would read back as "no number"), and an
entry with a non-finite or missing mass, as an older version wrote for a faulty judge's NaN logprobs, reads as
absent, so it is judged again rather than served.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
from pathlib import Path

from emalib.evaluation.judge.scoring import Judgment


def judgment_key(judge_model: str, prompt: str, mode: str = "logprobs") -> str:
    tag = judge_model if mode == "logprobs" else f"{judge_model}\x00{mode}"
    return hashlib.sha256(f"{tag}\x00{prompt}".encode()).hexdigest()


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


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
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(judgments)")}
        if "mode" not in columns:  # a cache written before judgments recorded their mode: all logprob ones
            self._db.execute("ALTER TABLE judgments ADD COLUMN mode TEXT DEFAULT 'logprobs'")
        self._db.commit()

    def get(self, judge_model: str, prompt: str, cache_mode: str = "logprobs") -> Judgment | None:
        with self._lock:
            row = self._db.execute("SELECT score, numeric_mass, raw, mode FROM judgments WHERE key = ?",
                                   (judgment_key(judge_model, prompt, cache_mode),)).fetchone()
        if row is None or not _finite(row[1]) or (row[0] is not None and not _finite(row[0])):
            return None
        return Judgment(score=row[0], numeric_mass=row[1], judge_model=judge_model, raw=json.loads(row[2]),
                        mode=row[3] or "logprobs")

    def put(self, prompt: str, judgment: Judgment, cache_mode: str | None = None) -> None:
        """cache_mode: the judge's (default: the judgment's mode, which is the cache mode of all but sampled)."""
        if not _finite(judgment.numeric_mass) or (judgment.score is not None and not _finite(judgment.score)):
            raise ValueError(f"judgment of {judgment.judge_model} with score {judgment.score!r} and mass "
                             f"{judgment.numeric_mass!r} is not cached: not a finite number")
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO judgments (key, judge_model, score, numeric_mass, raw, mode) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (judgment_key(judgment.judge_model, prompt, cache_mode or judgment.mode), judgment.judge_model,
                 judgment.score, judgment.numeric_mass, json.dumps(judgment.raw), judgment.mode))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
