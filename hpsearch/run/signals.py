"""Ctrl-C and SIGTERM for a whole run, from the workers' start to the end of the report.

The first signal asks the run to stop: while workers train, they save their resume state and
exit; while the report is being measured, the work is abandoned at once (``Interrupted`` is
raised in the main thread). A second signal exits immediately.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType

from hpsearch.errors import EXIT_SIGNAL, Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Installs the run's handlers on enter and restores the previous ones on exit.

    Args:
        on_first: Called for the first signal while the run is not raising.
        on_second: Called for the second signal, just before the process exits.
        enabled: False leaves the process's handlers alone (not the main thread).
    """

    def __init__(self, on_first: Callable[[], None], on_second: Callable[[], None],
                 enabled: bool = True) -> None:
        self.on_first, self.on_second, self.enabled = on_first, on_second, enabled
        self.received: list[int] = []
        self._raising = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if self.enabled:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    @property
    def stopping(self) -> bool:
        return bool(self.received)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(signal.Signals(self.received[0]), 130) if self.received else 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received:
            self.on_second()
            os._exit(EXIT_SIGNAL.get(signal.Signals(signum), 130))
        self.received.append(signum)
        if self._raising:
            raise Interrupted(signum)
        self.on_first()

    def check(self) -> None:
        """Raise ``Interrupted`` if a signal came (also one whose raise was lost, e.g. in a
        finalizer, where Python only prints "Exception ignored")."""
        if self.received:
            raise Interrupted(self.received[0])

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Within this block the first signal raises ``Interrupted`` instead of asking."""
        self.check()
        self._raising = True
        try:
            yield
        finally:
            self._raising = False
