"""Progress bars in real units (answers sampled, judgments, training steps, candidates scored) that reach the
console of `python -m emalib run` from inside the notebook's kernel.

The kernel's own output goes to the run's log.txt, so a bar here is two things: a tqdm bar in this process (what
a person running a notebook by hand sees) and, when EMALIB_PROGRESS_FILE names a file, its state appended to that
file as one JSON line at most every REPORT_EVERY_S seconds (and always at its end). The CLI sets the variable for
each step's kernel and draws the bars from the file (emalib/runs/console_progress.py). EMALIB_PROGRESS=0 turns the
tqdm bars off; the file is written whenever it is named.

Judging is tracked at the judgment cache, which every judge (online, batch, local) writes each judgment to as it
arrives, so the bar needs no hook inside the judges. It shows the judge's calls and estimated cost so far.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

PROGRESS_FILE_ENV = "EMALIB_PROGRESS_FILE"
REPORT_EVERY_S = 0.5


class Progress:
    """A bar over `total` units of `unit` (plural, e.g. "answers"), starting at `initial` (work resumed)."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0):
        from tqdm.auto import tqdm

        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.postfix: dict = {}
        self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", initial=initial,
                         disable=total == 0 or os.environ.get("EMALIB_PROGRESS") == "0")
        target = os.environ.get(PROGRESS_FILE_ENV)
        self._file = Path(target) if target and total > 0 else None
        self._id, self._reported = uuid.uuid4().hex[:12], 0.0
        self._report()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._bar.update(n)
        if time.monotonic() - self._reported >= REPORT_EVERY_S or self.n >= self.total:
            self._report()

    def set_postfix(self, postfix: dict, refresh: bool = False) -> None:
        self.postfix = dict(postfix)
        self._bar.set_postfix(postfix, refresh=refresh)

    def close(self) -> None:
        self._report(closed=True)
        self._bar.close()

    def _report(self, closed: bool = False) -> None:
        if self._file is None:
            return
        line = json.dumps({"id": self._id, "desc": self.desc, "unit": self.unit, "total": self.total, "n": self.n,
                           "postfix": {k: str(v) for k, v in self.postfix.items()}, "closed": closed})
        # One write of one line in append mode: the reader never sees two states interleaved.
        with open(self._file, "a", encoding="utf-8") as sink:
            sink.write(line + "\n")
        self._reported = time.monotonic()


@contextmanager
def progress(total: int, desc: str, unit: str, initial: int = 0):
    """A Progress that is closed (and so reported as ended) however the block ends."""
    bar = Progress(total, desc, unit, initial)
    try:
        yield bar
    finally:
        bar.close()


class TrackedCache:
    """A judgment cache that moves a progress bar at every judgment stored (all other calls pass through)."""

    def __init__(self, cache, bar: Progress, judge):
        self._cache, self._bar, self._judge = cache, bar, judge
        self.judged = 0

    def put(self, prompt, judgment, *args, **kwargs):
        self._cache.put(prompt, judgment, *args, **kwargs)
        self.judged += 1
        usage = self._judge.usage() if hasattr(self._judge, "usage") else {}
        postfix = {"calls": usage.get("calls", getattr(self._judge, "calls", 0))}
        if "estimated_cost_usd" in usage:
            postfix["cost_usd"] = f"{usage['estimated_cost_usd']:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def __getattr__(self, name):
        return getattr(self._cache, name)


@contextmanager
def judging_progress(cache, judge, total: int, cached: int = 0):
    """Yield a TrackedCache over `cache` whose bar counts `total` judgments of `judge`, `cached` of them done."""
    with progress(total, f"judging ({judge.name})", "judgments", cached) as bar:
        yield TrackedCache(cache, bar, judge)


@contextmanager
def scoring_progress(total: int, desc: str):
    """A bar over `total` scored candidates; call .update(n) on it."""
    with progress(total, desc, "candidates") as bar:
        yield bar
