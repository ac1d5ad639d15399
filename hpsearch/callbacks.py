"""What a trial tells the outside while it trains: the user's callbacks (``callbacks:``) and
the TensorBoard scalars (``logging.tensorboard``).

A callback is ``"package.module:function"``, called in the worker process as ``fn(event)``
with a :class:`TrialEvent` after every epoch (``kind="epoch"``) and once when the trial ends
(``kind="trial_end"``), so the user can feed MLflow, a chat bot or a file without hpsearch
depending on any of them. A callback that raises fails its trial: the trial's
``fail_reason`` is ``CallbackError: callback <reference> failed on <kind> ...``. A trial
that fails for another reason still sends its ``trial_end`` event; if a callback raises
then, the error is written to the trial's ``train.log`` and the original reason stands.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hpsearch import user_code
from hpsearch.errors import CallbackError


@dataclass(frozen=True)
class TrialEvent:
    """One thing that happened to a trial.

    Attributes:
        kind: ``"epoch"`` after each epoch, ``"trial_end"`` when the trial ends.
        trial: The Optuna trial number.
        epoch: The epoch just finished (``trial_end``: the last one trained; None if none).
        metrics: That epoch's record: ``train_loss``, ``val_<metric>``..., ``lr``,
            ``seconds`` (``trial_end``: the last epoch's; empty if none).
        state: ``"RUNNING"`` for epochs; ``"COMPLETE"``, ``"PRUNED"`` or ``"FAIL"`` at the end.
        value: The study metric: of this epoch, or the trial's value when it completes
            (None when pruned or failed).
        params: The trial's parameters as the study file names them (``flat()``).
    """

    kind: Literal["epoch", "trial_end"]
    trial: int
    epoch: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    state: str = "RUNNING"
    value: float | None = None
    params: dict[str, Any] = field(default_factory=dict)


class Callbacks:
    """The study's callbacks, resolved once per trial."""

    def __init__(self, references: Sequence[str]) -> None:
        self.functions: list[tuple[str, Callable[[TrialEvent], Any]]] = [
            (ref, user_code.resolve(ref)) for ref in references
        ]

    def __call__(self, event: TrialEvent) -> None:
        """Call each callback in order.

        Raises:
            CallbackError: A callback raised; it names the callback and the event.
        """
        for ref, fn in self.functions:
            try:
                fn(event)
            except Exception as err:
                raise CallbackError(
                    f"callback {ref} failed on {event.kind} of trial {event.trial}: "
                    f"{type(err).__name__}: {err}") from err


class TensorBoardLog:
    """A trial's per-epoch scalars in ``trials/<n>/tensorboard/`` (one SummaryWriter)."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # only studies that log import it

        self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, record: dict[str, float]) -> None:
        step = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
