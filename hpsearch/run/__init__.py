"""Running a study: :func:`run_config`, the engine under ``hpsearch.run_study`` (the Python API)
and ``python -m hpsearch.run`` (the CLI). Use ``hpsearch.run_study``."""

from hpsearch.run.runner import RunOutcome, run_config

__all__ = ["RunOutcome", "run_config"]
