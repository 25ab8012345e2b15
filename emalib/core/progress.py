"""Progress bars for the long loops that are not sampling: judging (any backend) and candidate scoring.

Judging is tracked at the judgment cache, which every judge (online, batch, local) writes each judgment to as it
arrives, so the bar needs no hook inside the judges. The bar shows judged / to judge, and the judge's calls and
estimated cost so far (what its `usage()` reports). EMALIB_PROGRESS=0 turns the bars off.
"""

from __future__ import annotations

import os
from contextlib import contextmanager


def _bar(total: int, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=total == 0 or os.environ.get("EMALIB_PROGRESS") == "0")


class TrackedCache:
    """A judgment cache that moves a progress bar at every judgment stored (all other calls pass through)."""

    def __init__(self, cache, bar, judge):
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
def judging_progress(cache, judge, total: int):
    """Yield a TrackedCache over `cache` whose bar counts `total` judgments of `judge`."""
    bar = _bar(total, f"judging ({judge.name})", "judgment")
    try:
        yield TrackedCache(cache, bar, judge)
    finally:
        bar.close()


@contextmanager
def scoring_progress(total: int, desc: str):
    """A bar over `total` scored candidates; call .update(n) on it."""
    bar = _bar(total, desc, "candidate")
    try:
        yield bar
    finally:
        bar.close()
