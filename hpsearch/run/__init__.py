"""Running a study: ``run_study`` (the Python API) and ``python -m hpsearch.run`` (the CLI)."""

from hpsearch.run.runner import RunResult, run_study

__all__ = ["RunResult", "run_study"]
