"""The one contract every trainer keeps (warm-up: ``train.warmup.warmup``; GRPO fine-tuning:
``train.grpo.grpo_finetune``)::

    result = trainer(model, data, config, *, out, log, resume, progress, cancel) -> TrainResult

* ``config``: the trainer's dataclass; both spell the shared settings alike: ``learning_rate``
  (Adam), ``validate_every`` and ``checkpoint_every`` (in the trainer's unit: warm-up iterations,
  GRPO episodes), ``seed``.
* ``out``: the checkpoint (``NAME`` -> ``NAME.safetensors`` + ``NAME.json``, written atomically,
  with the optimizer and run state so that ``resume=True`` continues the same run).
* ``log``: the run log's stem (``RunLogger``: ``.jsonl`` + ``.csv``, one row per optimizer step);
  default :func:`default_log` of ``out`` (``NAME.log.jsonl`` / ``NAME.log.csv`` beside the checkpoint);
  no log when both are None. Opened at the first row: a run stopped at once writes no log.
* ``progress``: ``progress(done, total, row)`` after every logged row, ``done``/``total`` in the
  trainer's unit; ``True`` for a tqdm bar.
* ``cancel()``: polled before every optimizer step. When it returns True, or on Ctrl-C (the first
  one is deferred to that boundary, see :func:`deferred_interrupt`), the work done up to the last
  whole unit is checkpointed (when it is not on disk already) and ``Cancelled`` (or
  ``KeyboardInterrupt``) is raised: nothing is returned, and a run stopped before its first unit
  leaves ``out`` as it was.
* The result: :class:`TrainResult`.

The names of one idea, used everywhere: ``optimizer`` (torch's spelling, also the checkpoint's key),
``learning_rate``, ``validate_every``, ``episodes`` (GRPO pair visits, each ``steps`` optimizer steps),
``trajectories`` (J, the sampled candidates of one step; ``Candidate`` is one of them).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from morphseek.train.trainlog import RunLogger

__all__ = ["TrainResult", "Progress", "default_log", "RunLog", "deferred_interrupt", "raised_by"]

#: ``progress(done, total, row)``: units done (warm-up iterations / GRPO episodes), units in all, the row.
Progress = Callable[[int, int, dict], None]


@dataclass
class TrainResult:
    """What a trainer returns when it ran to the end."""

    model: Any  # the trained MorphSeekNet (the same object that was passed in)
    checkpoint: Path | None  # NAME.safetensors written last (None when ``out`` was None)
    done: int  # units completed in all (warm-up iterations / GRPO episodes), resumed ones included
    optimizer_steps: int  # optimizer steps in all, resumed ones included
    last: dict[str, Any] = field(default_factory=dict)  # the last row logged ({} when none)
    history: list[dict[str, Any]] = field(default_factory=list)  # the rows logged by this call
    validation: dict[str, float] = field(default_factory=dict)  # the last held-back evaluation ({} when none)
    # the held-back evaluation of the model as it came, before any training ({} when none): what
    # ``validation`` is to be compared with (GRPO; a warm-up starts from an untrained network)
    validation_start: dict[str, float] = field(default_factory=dict)

    @property
    def held_back_fell(self) -> bool:
        """Whether held-back Dice ended lower than the model's own before training (False when
        either evaluation is missing): then the model it started from registers these pairs better."""
        start, end = self.validation_start.get("val_dice"), self.validation.get("val_dice")
        return start is not None and end is not None and end < start


def default_log(out: str | Path | None) -> Path | None:
    """The run log's stem beside the checkpoint ``out``: ``NAME.log`` (-> ``NAME.log.jsonl`` and
    ``NAME.log.csv``); None when ``out`` is None."""
    return None if out is None else Path(out).with_suffix(".log")


class RunLog:
    """A ``RunLogger`` opened at the first row (a run stopped at once writes nothing). On resume
    (``append``) the rows that ``keep`` rejects -- those written after the resumed checkpoint -- are
    dropped when it opens. ``path`` None: rows are only kept in :attr:`rows`."""

    def __init__(self, path: str | Path | None, append: bool, keep: Callable[[dict], bool]):
        self.path, self.append, self.keep = path, append, keep
        self._logger: RunLogger | None = None
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        if self.path is not None:
            if self._logger is None:
                self._logger = RunLogger(self.path, append=self.append)
                if self.append:
                    self._logger.truncate(self.keep)
            self._logger.log(row)
        self.rows.append(row)


@contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Within the block, a first Ctrl-C (SIGINT) only sets a flag that the training loop checks
    between optimizer steps (so the checkpoint it writes is a whole unit's state); a second Ctrl-C
    interrupts at once. Yields the flag's ``is_set``. Outside the main thread (Slicer's worker)
    signals do not arrive and the flag stays unset: use ``cancel`` there."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def raised_by(stop: BaseException, function: str) -> bool:
    """True when ``stop`` was raised by the frame of ``function`` itself (a trainer's loop at a clean
    boundary), not from inside a call it made (a second Ctrl-C in the middle of a step)."""
    tb = stop.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == function
