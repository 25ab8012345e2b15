"""Where emalib keeps downloads, the embedded model and the judge cache (EMALIB_CACHE), and the offline data mirror
(EMALIB_DATA_MIRROR)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("EMALIB_CACHE", Path.home() / ".cache" / "emalib"))


def mirror_dir() -> Path | None:
    value = os.environ.get("EMALIB_DATA_MIRROR")
    return Path(value) if value else None
