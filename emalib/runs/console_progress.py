"""The console's progress bars while papermill runs a step's notebook: the kernel appends its bars' states to a
file in the run folder (emalib.core.progress), and a thread here reads what was added every POLL_S seconds and
draws each bar with tqdm on stdout, in its own units with an ETA.

A file rather than papermill's stream output: the cells' output goes to log.txt, tqdm's carriage-return lines
arrive there cut at arbitrary points, and a file read by offset needs no parsing of another tool's log format.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from emalib.core.progress import PROGRESS_FILE_ENV

POLL_S = 0.5
PROGRESS_FILE = ".progress.jsonl"
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}{postfix}]"


class ProgressDrawer:
    """Reads the JSON lines added to `path` since the last read and draws one tqdm bar per reported bar id."""

    def __init__(self, path: Path, stream=None):
        self.path, self.stream = Path(path), stream or sys.stdout
        self.offset, self.pending, self.bars = 0, "", {}

    def poll(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as source:
                source.seek(self.offset)
                added = source.read()
                self.offset = source.tell()
        except FileNotFoundError:
            return
        lines = (self.pending + added).split("\n")
        self.pending = lines.pop()  # a line still being written ends with the next read
        for line in lines:
            if line.strip():
                self._draw(json.loads(line))

    def _draw(self, state: dict) -> None:
        from tqdm import tqdm

        bar = self.bars.get(state["id"])
        if bar is None:
            bar = self.bars[state["id"]] = tqdm(total=state["total"], initial=state["n"], desc=state["desc"],
                                                unit=f" {state['unit']}", bar_format=BAR_FORMAT, file=self.stream,
                                                postfix=state["postfix"] or None)
        elif state["postfix"]:
            bar.set_postfix(state["postfix"], refresh=False)
        if state["n"] > bar.n:
            bar.update(state["n"] - bar.n)
        if state["closed"]:
            bar.close()
            del self.bars[state["id"]]

    def close(self) -> None:
        self.poll()
        for bar in self.bars.values():  # a kernel that died mid-bar: the bar ends where it stood
            bar.close()
        self.bars.clear()


@contextmanager
def drawn_progress(run_dir: Path, enabled: bool = True):
    """For the duration: kernels started now report their bars to run_dir/.progress.jsonl (through the
    environment they inherit), and the bars are drawn on stdout; the file is removed afterwards."""
    path = Path(run_dir) / PROGRESS_FILE
    if not enabled or os.environ.get("EMALIB_PROGRESS") == "0":
        yield
        return
    path.unlink(missing_ok=True)
    saved = os.environ.get(PROGRESS_FILE_ENV)
    os.environ[PROGRESS_FILE_ENV] = str(path.resolve())
    drawer, stop = ProgressDrawer(path), threading.Event()

    def follow():
        while not stop.wait(POLL_S):
            drawer.poll()

    thread = threading.Thread(target=follow, name="emalib-progress", daemon=True)
    thread.start()
    try:
        yield drawer
    finally:
        stop.set()
        thread.join()
        drawer.close()
        if saved is None:
            os.environ.pop(PROGRESS_FILE_ENV, None)
        else:
            os.environ[PROGRESS_FILE_ENV] = saved
        path.unlink(missing_ok=True)
