"""The results folder of a study: every path in it, and finding it from what a user passes.

A :class:`ResultsLayout` is built once from the folder and is the only place that knows the
names inside it (``trials/<n>``, ``best``, ``.hpsearch/…``). :func:`locate` turns "a study file
or a results folder" into the study's config and layout, honouring ``--results-dir``, for every
command that takes one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from hpsearch.config import StudyConfig, load_config
from hpsearch.errors import UsageError
from hpsearch.files import atomic_write_text

DEFAULT_ROOT = "results"
MANIFEST = "manifest.json"  # in each trial folder: which checkpoint is which
RESUME_STATE = "last.pt"  # in a running trial's folder
REPORT_FILES = {
    "html": "report.html",
    "markdown": "report.md",
    "architectures_csv": "architectures.csv",
    "trials_csv": "trials.csv",
}


@dataclass(frozen=True)
class ResultsLayout:
    """Where one study keeps everything: ``<results root>/<study name>/``."""

    root: Path

    @classmethod
    def at(cls, folder: ResultsLayout | str | Path) -> ResultsLayout:
        """The layout of a results folder (given as a path, or already as its layout)."""
        return folder if isinstance(folder, ResultsLayout) else cls(Path(folder))

    @classmethod
    def of(cls, config: StudyConfig, results_root: str | Path = DEFAULT_ROOT) -> ResultsLayout:
        return cls(Path(results_root) / config.study.name)

    # ---- what a user reads
    @property
    def config_copy(self) -> Path:
        return self.root / "config.yaml"

    @property
    def journal(self) -> Path:
        return self.root / "journal.log"

    @property
    def run_log(self) -> Path:
        return self.root / "run.log"

    @property
    def best(self) -> Path:
        """A symlink to ``.best/trial-N``: the study best's ``model.pt`` and ``meta.json``."""
        return self.root / "best"

    @property
    def best_model(self) -> Path:
        return self.best / "model.pt"

    @property
    def best_meta(self) -> Path:
        return self.best / "meta.json"

    @property
    def best_stages(self) -> Path:
        return self.root / ".best"

    @property
    def trials(self) -> Path:
        return self.root / "trials"

    def trial(self, number: int) -> Path:
        return self.trials / str(number)

    def resume_state(self, number: int) -> Path:
        return self.trial(number) / RESUME_STATE

    def manifest(self, number: int) -> Path:
        return self.trial(number) / MANIFEST

    def train_log(self, number: int) -> Path:
        return self.trial(number) / "train.log"

    def tensorboard(self, number: int) -> Path:
        """A trial's TensorBoard event files (``logging.tensorboard``)."""
        return self.trial(number) / "tensorboard"

    def heartbeat(self, number: int) -> Path:
        return self.trial(number) / "heartbeat"

    @property
    def data_cache(self) -> Path:
        return self.root / "data"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def fetched(self, name: str) -> Path:
        """A copy of a file of another node's trial, fetched from the shared store."""
        return self.root / "fetched" / name

    def report_file(self, kind: str) -> Path:
        return self.root / REPORT_FILES[kind]

    # ---- run-time control files
    @property
    def control(self) -> Path:
        return self.root / ".hpsearch"

    @property
    def stop_file(self) -> Path:
        return self.control / "stop"

    @property
    def abort_file(self) -> Path:
        return self.control / "abort"

    def status_file(self, slot: int) -> Path:
        return self.control / "workers" / f"slot-{slot}.json"

    @property
    def status_files(self) -> Path:
        return self.control / "workers"

    def lock(self, name: str) -> Path:
        """``claim``, ``best``, ``retention`` or ``artifacts``."""
        return self.control / f"{name}.lock"

    @property
    def checkpoint_holders(self) -> Path:
        return self.control / "with-checkpoints.json"

    def relative(self, path: Path) -> str:
        """``path`` as recorded in user attributes: relative to the results folder."""
        return Path(path).relative_to(self.root).as_posix()


def save_config_copy(config: StudyConfig, layout: ResultsLayout) -> None:
    """Keep the resolved study beside its results, so tools need only the folder."""
    atomic_write_text(layout.config_copy, yaml.safe_dump(config.as_study_dict(), sort_keys=False))


def is_study_file(path: Path) -> bool:
    return path.suffix in (".yaml", ".yml")


def locate(target: str | Path, results_root: str | Path = DEFAULT_ROOT
           ) -> tuple[StudyConfig, ResultsLayout]:
    """A study file, or a results folder (its ``config.yaml``) -> (config, layout).

    Args:
        target: A study file, or a study's results folder.
        results_root: Where a study file's results live (the run's ``--results-dir``).

    Raises:
        UsageError: Neither a readable study file nor a results folder of a run (a malformed
            study file raises its ``ConfigError``, a ``UsageError`` too).
    """
    path = Path(target)
    if path.is_dir():
        layout = ResultsLayout(path)
        if not layout.config_copy.is_file():
            raise UsageError(f"{path}: not a results folder of an hpsearch run "
                             f"({layout.config_copy.name} is missing)")
        return load_config(layout.config_copy), layout
    if not path.exists():
        raise UsageError(f"{path} does not exist: pass a study file or a results folder")
    if not is_study_file(path):
        raise UsageError(f"{path} is neither a study file (.yaml) nor a results folder")
    config = load_config(path)
    return config, ResultsLayout.of(config, results_root)
