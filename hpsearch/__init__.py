"""hpsearch: parallel Optuna studies for PyTorch with best-epoch checkpoints and reports.

The public API: run a study (``run_study``, returning a ``StudyResult``), load what it kept
(``load_best_model``, ``load_model``, ``load_checkpoint``), read a study file
(``load_config``), and the errors.
"""

from hpsearch.api import BestTrial, StudyResult, run_study
from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.loading import load_best_model, load_model
from hpsearch.config import StudyConfig, load_config
from hpsearch.errors import (
    CheckpointError,
    ConfigError,
    HpsearchError,
    Interrupted,
    UsageError,
)
from hpsearch.version import __version__

__all__ = [
    "BestTrial",
    "CheckpointError",
    "ConfigError",
    "HpsearchError",
    "Interrupted",
    "StudyConfig",
    "StudyResult",
    "UsageError",
    "__version__",
    "load_best_model",
    "load_checkpoint",
    "load_config",
    "load_model",
    "run_study",
]
