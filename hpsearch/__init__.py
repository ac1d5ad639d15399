"""hpsearch: parallel Optuna studies for PyTorch with best-epoch checkpoints and reports.

The public API: run a study (``run_study``), load what it kept (``load_best_model``,
``load_model``, ``load_checkpoint``), read a study file (``load_config``), and the errors.
"""

from hpsearch.checkpoint.format import load_checkpoint
from hpsearch.checkpoint.loading import load_best_model, load_model
from hpsearch.config import StudyConfig, load_config
from hpsearch.errors import CheckpointError, ConfigError, HpsearchError, UsageError
from hpsearch.run import RunResult, run_study
from hpsearch.version import __version__

__all__ = [
    "CheckpointError",
    "ConfigError",
    "HpsearchError",
    "RunResult",
    "StudyConfig",
    "UsageError",
    "__version__",
    "load_best_model",
    "load_checkpoint",
    "load_config",
    "load_model",
    "run_study",
]
