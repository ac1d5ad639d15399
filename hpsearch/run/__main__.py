"""``python -m hpsearch.run STUDY.yaml [flags]``: run or continue a study.

Parses arguments, loads the study file, applies the flags, and hands over to
:func:`hpsearch.run.run_study`. A malformed study file or flag exits 2 with one message.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

import optuna

from hpsearch.config import StudyConfig, load_config, parse_config
from hpsearch.errors import run_cli
from hpsearch.run.runner import run_study


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
    p.add_argument("--results-dir", default="results", help="output root (default: results/)")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    return p


def apply_overrides(config: StudyConfig, args: argparse.Namespace, source: str) -> StudyConfig:
    """Flags override the file; the result is validated like the file itself."""
    raw = config.as_study_dict()
    if args.n_trials is not None:
        raw["study"]["n_trials"] = args.n_trials
    if args.workers is not None:
        raw["resources"]["workers"] = int(args.workers) if args.workers.isdigit() else args.workers
    if args.devices is not None:
        raw["resources"]["devices"] = (
            args.devices if args.devices in ("auto", "cpu") else args.devices.split(",")
        )
    if args.storage is not None:
        raw["study"]["storage"] = args.storage
    if args.timeout is not None:
        raw["study"]["timeout"] = args.timeout
    if args.no_report:
        raw["report"]["enabled"] = False
    return parse_config(raw, f"{source} (with command-line flags)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # hpsearch prints its own progress; Optuna's per-trial INFO lines would drown it.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    words = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["python", "-m", "hpsearch.run", *words])

    def body() -> int:
        config = apply_overrides(load_config(args.study_file), args, args.study_file)
        return run_study(config, args.results_dir, source=args.study_file,
                         command=command).exit_code

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        # Ctrl-C before the workers started: nothing to save.
        print("interrupted before the study started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
