"""``python -m hpsearch.run STUDY.yaml [flags]``: run or continue a study.

Parses arguments, then takes the same path as ``hpsearch.run_study``: the study file and the
flags through :func:`hpsearch.api.study_config`, the run through
:func:`hpsearch.run.run_config`, whose outcome is the exit status here (the Python API raises
instead). A malformed study file or flag exits 2 with one message.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from hpsearch.api import Overrides, study_config
from hpsearch.errors import run_cli
from hpsearch.run.runner import run_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpsearch.run", description="Run or continue an hpsearch study."
    )
    p.add_argument("study_file", help="the study's YAML file")
    p.add_argument("--n-trials", type=int, help="override study.n_trials")
    p.add_argument("--workers", help="override resources.workers (a number or auto)")
    p.add_argument("--devices", help="override resources.devices: auto, cpu, or cuda:0,cuda:1")
    p.add_argument("--storage", help="override study.storage (an Optuna storage URL or path)")
    p.add_argument("--timeout", type=float, help="override study.timeout (seconds)")
    p.add_argument("--scheduler", help="override resources.scheduler: run the workers on the "
                   "Dask cluster of this scheduler (tcp://host:8786)")
    p.add_argument("--results-dir", default="results", help="output root (default: results/)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    return p


def overrides(args: argparse.Namespace) -> Overrides:
    """The flags that replace the study file's values."""
    return Overrides(n_trials=args.n_trials, workers=args.workers, devices=args.devices,
                     storage=args.storage, timeout=args.timeout,
                     report=False if args.no_report else None, scheduler=args.scheduler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    words = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "hpsearch.run", *words])

    def body() -> int:
        config, source = study_config(args.study_file, overrides(args), "command-line flags")
        return run_config(config, args.results_dir, source=source, command=command).exit_code

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        # Ctrl-C before the workers started: nothing to save.
        print("interrupted before the study started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
