"""Every error hpsearch raises, and the one place that turns them into exit codes and messages.

Each command-line entry point runs its body through :func:`run_cli`: an ``HpsearchError``
prints one ``error: …`` line and exits with the class's ``exit_code``; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class HpsearchError(Exception):
    """Base of every hpsearch error. ``str(err)`` is the one-line message for the user."""

    exit_code = EXIT_FAILED


class UsageError(HpsearchError):
    """A command was given something it cannot use (no such study, folder or device)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """A study file or argument is malformed: names the file, the key path and the problem."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key or '<top level>'}: {problem}")


class CheckpointError(HpsearchError, RuntimeError):
    """A checkpoint is missing, corrupt, does not match its recorded sha256, or cannot be
    loaded where it was asked to be."""


class FileWriteError(HpsearchError, OSError):
    """A file could not be written; the message names the path."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


class CallbackError(HpsearchError, RuntimeError):
    """A user callback (``callbacks:``) raised: the trial fails, and this names the callback."""


class Interrupted(HpsearchError):
    """A stop was requested (Ctrl-C, SIGTERM); raised where work can stop cleanly."""

    def __init__(self, signum: int = signal.SIGINT, message: str = "interrupted") -> None:
        self.signum = signum
        super().__init__(message)

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_SIGNAL.get(signal.Signals(self.signum), 130)


def run_cli(body: Callable[[], int]) -> int:
    """Run a command's body; an ``HpsearchError`` becomes its message and exit code."""
    try:
        return body()
    except HpsearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
