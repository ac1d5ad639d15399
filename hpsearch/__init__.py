"""hpsearch: parallel Optuna studies for PyTorch with best-epoch checkpoints and reports."""

__version__ = "0.1.0"

from hpsearch.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from hpsearch.config import ConfigError, StudyConfig, load_config  # noqa: E402
from hpsearch.loading import load_best_model, load_model  # noqa: E402

__all__ = [
    "CheckpointError",
    "ConfigError",
    "StudyConfig",
    "__version__",
    "load_best_model",
    "load_checkpoint",
    "load_config",
    "load_model",
    "run_study",
]


def run_study(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Run a study; see :func:`hpsearch.launch.run_study`."""
    from hpsearch.launch import run_study as _run

    return _run(*args, **kwargs)
