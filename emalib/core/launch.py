"""emalib trains one run per process: a multi-process launch (torchrun, accelerate launch) is refused.

Under data parallelism the defenses would be handed the DDP wrapper (no disable_adapter, no config) and the loss
would miss Trainer's per-process token averaging, so the run would be silently wrong. Studies use many GPUs by
running one run per GPU through their executors instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from emalib.core.errors import EmalibError


def refuse_multi_process(environ: Mapping[str, str] = os.environ) -> None:
    """Raise one line when this process is one of several launched together (WORLD_SIZE > 1)."""
    world_size = environ.get("WORLD_SIZE", "1")
    if world_size.strip() not in ("", "0", "1"):
        raise EmalibError(
            f"WORLD_SIZE={world_size}: emalib trains one run per process and does not support torchrun or "
            "accelerate launch; to use several GPUs run a study, one run per GPU "
            "(python -m emalib study FILE --executor local|ray|slurm --gpus-per-run 1)")
