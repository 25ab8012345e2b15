"""emalib: in-training defenses against emergent misalignment (Kaczér et al., arXiv 2508.06249), reproduced.

Importing emalib loads no model and no heavy framework; each step imports what it needs when it runs.
"""

from emalib.core.config import RunParams, load_params
from emalib.core.errors import DataError, EmalibError, JudgeError, ParamsError

__version__ = "0.1.0"
__all__ = ["DataError", "EmalibError", "JudgeError", "ParamsError", "RunParams", "__version__", "load_params"]
