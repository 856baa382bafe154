"""Long work off the GUI thread, without Qt: a worker thread runs a function that reports progress
through a callback and polls a cancel flag; the GUI polls ``BackgroundJob.poll()`` from a timer
(qt.QTimer in Slicer) and receives events in order. MRML nodes are created by the caller from the
result on the main thread, so a cancelled or failed job leaves nothing behind.

PyTorch releases the GIL in its kernels, so the GUI stays responsive while the worker computes.
"""

from __future__ import annotations

import enum
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from morphseek.errors import Cancelled, MorphSeekError

Work = Callable[[Callable[[Any], None], Callable[[], bool]], Any]


class JobState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


class EventKind(enum.Enum):
    PROGRESS = "progress"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class JobEvent:
    kind: EventKind
    payload: Any = None  # the progress event, the result, or the error message
    details: str = ""  # traceback for unexpected errors


class BackgroundJob:
    """Runs ``work(progress, cancel)`` in a daemon thread.

    ``progress(event)`` queues ``event`` for the GUI; ``cancel()`` returns True once ``cancel_job()``
    was called (the work is expected to check it between steps). The job ends with exactly one
    FINISHED (payload = return value), CANCELLED, or FAILED event (payload = a message for the user:
    a MorphSeekError's own text, otherwise the exception's type and text; ``details`` = traceback)."""

    def __init__(self, work: Work, name: str = "MorphSeek job"):
        self._work = work
        self._events: queue.Queue[JobEvent] = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.state = JobState.PENDING
        self.result: Any = None
        self.error: str | None = None

    def start(self) -> "BackgroundJob":
        self.state = JobState.RUNNING
        self._thread.start()
        return self

    def cancel_job(self) -> None:
        """Ask the work to stop at its next check."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True when it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def poll(self) -> list[JobEvent]:
        """Events since the last poll, in order; updates ``state``, ``result`` and ``error``."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            events.append(event)
            if event.kind is EventKind.FINISHED:
                self.state, self.result = JobState.FINISHED, event.payload
            elif event.kind is EventKind.CANCELLED:
                self.state = JobState.CANCELLED
            elif event.kind is EventKind.FAILED:
                self.state, self.error = JobState.FAILED, event.payload
        return events

    def _run(self) -> None:
        try:
            result = self._work(self._progress, self._cancel.is_set)
        except Cancelled:
            self._events.put(JobEvent(EventKind.CANCELLED, "cancelled"))
        except MorphSeekError as error:
            self._events.put(JobEvent(EventKind.FAILED, str(error), traceback.format_exc()))
        except Exception as error:  # noqa: BLE001 - every failure must reach the panel
            message = f"{type(error).__name__}: {error}"
            self._events.put(JobEvent(EventKind.FAILED, message, traceback.format_exc()))
        else:
            if self._cancel.is_set():
                # Asked to stop after the last check: the user wanted nothing, so nothing is delivered.
                self._events.put(JobEvent(EventKind.CANCELLED, "cancelled"))
            else:
                self._events.put(JobEvent(EventKind.FINISHED, result))

    def _progress(self, event: Any) -> None:
        self._events.put(JobEvent(EventKind.PROGRESS, event))
