"""What a defense costs while training: the wall time of every optimizer step and the peak memory of the run, kept in
the train step's summary (manifest.json 'train', train_log.json) so the report can set each defense's cost beside
plain SFT's (docs/methods.md#the-defense-comparison)."""

from __future__ import annotations

import resource
import sys
import time

import torch
from transformers import TrainerCallback


def _cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class StepCost(TrainerCallback):
    """Times each optimizer step (all its micro-batches, the defenses' terms and the optimizer update) and reads the
    peak memory when training ends: on CUDA the most the allocator held (reset when training begins, so the
    model's load is in it but no earlier run's); on CPU the process's peak resident set, which also counts what
    the process held before training (the model, the data)."""

    def __init__(self):
        self.step_seconds: list[float] = []
        self._started: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if _cuda():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        if _cuda():
            torch.cuda.synchronize()  # the previous step's kernels are not this step's time
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            if _cuda():
                torch.cuda.synchronize()
            self.step_seconds.append(time.perf_counter() - self._started)
            self._started = None

    def summary(self) -> dict:
        if _cuda():
            peak, kind = torch.cuda.max_memory_allocated() / 2**30, "cuda_max_allocated"
        else:
            # ru_maxrss is KiB on Linux and bytes on macOS
            scale = 2**30 if sys.platform == "darwin" else 2**20
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, "cpu_max_rss"
        seconds = self.step_seconds
        return {"step_seconds": [round(s, 6) for s in seconds],
                "step_seconds_mean": sum(seconds) / len(seconds) if seconds else None,
                "peak_memory_gib": peak, "peak_memory_kind": kind}
