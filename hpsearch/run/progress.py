"""What the parent prints: live progress while workers run, and the summary at the end.

Computing the view (``snapshot``) is separate from printing it: a terminal gets a block that
redraws in place, anything else gets plain lines when something changed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import IO, Any

import optuna

from hpsearch import attrs
from hpsearch.config import StudyConfig
from hpsearch.ranking import architecture_of, best_trial
from hpsearch.results import ResultsLayout
from hpsearch.storage.trials import state_counts


@dataclass
class View:
    complete: int
    pruned: int
    failed: int
    running: int
    total: int
    best: tuple[int, float, str] | None
    workers: list[dict[str, Any]]


def snapshot(study: optuna.Study, config: StudyConfig, workers: list[dict[str, Any]]) -> View:
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    b = best_trial(trials, config.minimize)
    best = None if b is None else (b.number, float(b.value), str(architecture_of(b)))
    return View(
        complete=counts["COMPLETE"],
        pruned=counts["PRUNED"],
        failed=counts["FAIL"] - counts["RETRIED"],
        running=counts["RUNNING"],
        total=config.study.n_trials,
        best=best,
        workers=workers,
    )


def lines(view: View, metric: str) -> list[str]:
    done = view.complete + view.pruned + view.failed
    head = (
        f"trials {done}/{view.total}: {view.complete} complete, {view.pruned} pruned, "
        f"{view.failed} failed, {view.running} running"
    )
    if view.best:
        n, v, arch = view.best
        head += f" | best {metric}={v:.4f} (trial {n}, {arch})"
    out = [head]
    for w in view.workers:
        where = f"  worker {w.get('slot')} [{w.get('device')}]"
        if w.get("trial") is None:
            out.append(f"{where} {w.get('state', 'idle')}")
            continue
        epoch = w.get("epoch")
        value = w.get("value")
        current = f" {metric}={value:.4f}" if isinstance(value, float) else ""
        ep = f" epoch {epoch}" if epoch is not None else " starting"
        out.append(f"{where} trial {w['trial']}{ep}{current}")
    return out


class Printer:
    """Redraws in place on a terminal; prints plain lines on change otherwise."""

    def __init__(self, metric: str, stream: IO[str] | None = None, every: float = 10.0) -> None:
        self.metric, self.stream = metric, stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every = every
        self._last_head = ""
        self._last_time = 0.0
        self._drawn = 0

    def show(self, view: View) -> None:
        text = lines(view, self.metric)
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self.stream.write("\n".join(text) + "\n")
            self._drawn = len(text)
        elif text[0] != self._last_head or time.monotonic() - self._last_time > self.every:
            # Plain lines for logs and pipes: the whole block, only when something moved.
            self.stream.write("\n".join(text) + "\n")
            self._last_head, self._last_time = text[0], time.monotonic()
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.tty and self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()


def summary(study: optuna.Study, config: StudyConfig, layout: ResultsLayout) -> str:
    """The closing text: trials by state, the best trial, where it is, how to use it."""
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    out = [
        f"Study {config.study.name}: {counts['COMPLETE']} complete, {counts['PRUNED']} pruned, "
        f"{counts['FAIL'] - counts['RETRIED']} failed"
        + (f" ({counts['RETRIED']} more failed and were resumed)" if counts["RETRIED"] else "")
        + (f", {counts['RUNNING']} running" if counts["RUNNING"] else "")
        + (f", {counts['WAITING']} waiting" if counts["WAITING"] else "")
    ]
    best = best_trial(trials, config.minimize)
    if best is None:
        out.append("No trial completed yet: there is no best model.")
        return "\n".join(out)
    params = {k: v for k, v in best.params.items() if k != attrs.ARCHITECTURE}
    out.append(
        f"Best trial {best.number}: {config.study.metric}={best.value:.4f} "
        f"(epoch {best.user_attrs.get(attrs.BEST_EPOCH)}), "
        f"architecture {architecture_of(best)}"
    )
    if params:
        out.append("  params: " + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
    results_dir = layout.root
    if layout.best_model.exists():
        out.append(f"  checkpoint: {layout.best_model}")
        out.append(
            f'  load it:   python -c "import hpsearch; '
            f"print(hpsearch.load_best_model('{results_dir}'))\""
        )
        out.append(f"  verify it: python -m hpsearch.verify {results_dir}")
    out.append(f"  dashboard: python -m hpsearch.dashboard {results_dir}")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
