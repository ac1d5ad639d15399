"""``python -m hpsearch.report <study file | results folder> [--results-dir DIR] [--no-seeds]``,
or ``python -m hpsearch.report --storage URL [--study NAME]`` from a machine that ran no trial

Rebuilds a study's report from its storage and checkpoints, at any time, also while the study
is still running. Bad arguments exit 2 with one ``error:`` line; a file that cannot be written
exits 1 naming it; Ctrl-C exits 130 (SIGTERM 143) with one line saying what was (not)
written.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

import optuna

from hpsearch import ranking
from hpsearch.checkpoint.shared import open_recorded
from hpsearch.errors import EXIT_OK, EXIT_SIGNAL, Interrupted, UsageError, run_cli
from hpsearch.report.build import build_report
from hpsearch.report.data import fmt_num, load_call
from hpsearch.results import DEFAULT_ROOT, REPORT_FILES, ResultsLayout
from hpsearch.run.signals import StopSignals
from hpsearch.storage.backends import open_study
from hpsearch.workers.slots import plan_slots


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpsearch.report",
        description="Rebuild a study's report from its storage and checkpoints; works while "
        "the study is still running.",
    )
    p.add_argument("study", nargs="?",
                   help="the study's YAML file, or its results folder (none with --storage)")
    p.add_argument(
        "--results-dir", default=DEFAULT_ROOT,
        help=f"results root when given a study file or --storage (default: {DEFAULT_ROOT}/)",
    )
    p.add_argument("--storage", help="open the study from its storage URL alone (a run with "
                   "a shared artifact store), e.g. on a machine that ran no trial")
    p.add_argument("--study", dest="study_name",
                   help="with --storage: the study's name, when the storage holds several")
    p.add_argument("--no-seeds", action="store_true", help="skip the seed retrains")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Rebuild the report of a study file or results folder; returns the exit status.

    Bad arguments (no such file, not a results folder, a malformed study file, no study in
    the storage) print one line to stderr and return 2; a report file that cannot be written
    returns 1; Ctrl-C returns 130.
    """
    args = _parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    files = _ReportFiles()
    # The first Ctrl-C or SIGTERM raises Interrupted; the second exits at once.
    signals = StopSignals(on_first=lambda: None, on_second=lambda: None,
                          enabled=threading.current_thread() is threading.main_thread())

    def body() -> int:
        try:
            with signals, signals.raising():
                return _rebuild(args, files, signals)
        except (KeyboardInterrupt, Interrupted) as err:
            print(f"interrupted: {files.what_was_written()}; the study is unchanged",
                  file=sys.stderr)
            return err.exit_code if isinstance(err, Interrupted) else EXIT_SIGNAL[signal.SIGINT]

    return run_cli(body)


def _rebuild(args: argparse.Namespace, files: _ReportFiles, signals: StopSignals) -> int:
    if args.storage:
        if args.study:
            raise UsageError("give a study file or results folder, or --storage, not both")
        # The study file and the shared store come from what the run recorded in the storage;
        # the report (and the data it scores with) goes to this machine's results folder.
        recorded = open_recorded(args.storage, args.study_name)
        config, study = recorded.config, recorded.study
        layout = ResultsLayout.of(config, args.results_dir)
        layout.root.mkdir(parents=True, exist_ok=True)
    elif args.study:
        config, layout, study = open_study(args.study, args.results_dir)
    else:
        raise UsageError("give a study file or results folder, or --storage URL")
    if args.no_seeds:
        config = config.model_copy(
            update={"report": config.report.model_copy(update={"seeds": 0})}
        )
    files.watch(layout)

    def progress(text: str) -> None:
        signals.check()  # the handler's own raise is lost where it lands in a finalizer
        print(text, flush=True)  # a pipe would otherwise hold it back until the end

    paths = build_report(config, study, layout, plan_slots(config.resources),
                         on_progress=progress)
    signals.check()
    for path in paths.values():
        print(f"wrote {path}")
    print(winner_line(study, config.study.metric, layout))
    return EXIT_OK


def winner_line(study: optuna.Study, metric: str, layout: ResultsLayout) -> str:
    """The study's best trial (Optuna's ``best_trial``, as the report's winner) in one line."""
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    best = ranking.best_trial(study.get_trials(deepcopy=False), minimize)
    if best is None:
        return "winner: none yet (no complete trial)"
    return (
        f"winner: {ranking.architecture_of(best)} (trial {best.number}, best {metric} "
        f"{fmt_num(ranking.complete_value(best))}); load it with "
        f"{load_call(layout.root.as_posix())}"
    )


class _ReportFiles:
    """Which report files this command replaced, so that an interrupt says the truth: each
    atomic write gives a file a new inode."""

    def __init__(self) -> None:
        self.layout: ResultsLayout | None = None
        self.before: dict[str, int | None] = {}

    def watch(self, layout: ResultsLayout) -> None:
        self.layout, self.before = layout, self._inodes(layout)

    def what_was_written(self) -> str:
        if self.layout is None:
            return "the report was not written"
        now = self._inodes(self.layout)
        replaced = [name for name, inode in now.items()
                    if inode is not None and inode != self.before[name]]
        if not replaced:
            return "the report was not written"
        if len(replaced) == len(now):
            return f"the report was written to {self.layout.root}"
        return (f"the report was partly rewritten ({', '.join(replaced)} new, the other files "
                "as before)")

    @staticmethod
    def _inodes(layout: ResultsLayout) -> dict[str, int | None]:
        inodes: dict[str, int | None] = {}
        for kind, name in REPORT_FILES.items():
            try:
                inodes[name] = layout.report_file(kind).stat().st_ino
            except OSError:
                inodes[name] = None
        return inodes


if __name__ == "__main__":
    sys.exit(main())
