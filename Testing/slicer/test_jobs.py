"""The Qt-free background job: progress arrives in order, cancel stops at the next check, errors
come back as messages, and the result is delivered only on success."""

from __future__ import annotations

import threading
import time

from morphseek.errors import Cancelled, MorphSeekError
from MorphSeekLib.jobs import BackgroundJob, EventKind, JobState


def drain(job: BackgroundJob, timeout: float = 10.0):
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += job.poll()
        if events and events[-1].kind is not EventKind.PROGRESS:
            return events
        time.sleep(0.005)
    raise AssertionError(f"job did not end within {timeout} s")


def stepper(n_steps: int, step_seconds: float = 0.0, started: threading.Event | None = None):
    """Work that reports n steps and checks cancel between them, as the engine does."""
    def work(progress, cancel):
        for step in range(1, n_steps + 1):
            if cancel():
                raise Cancelled("stopped")
            if started is not None and step == 2:
                started.set()
            time.sleep(step_seconds)
            progress(step)
        return "done"
    return work


def test_progress_arrives_in_order_and_result_is_delivered():
    job = BackgroundJob(stepper(5)).start()
    events = drain(job)
    assert [e.payload for e in events[:-1]] == [1, 2, 3, 4, 5]
    assert events[-1].kind is EventKind.FINISHED and events[-1].payload == "done"
    assert job.state is JobState.FINISHED and job.result == "done"
    assert job.join(1.0)


def test_cancel_stops_within_one_step():
    reached_step_2 = threading.Event()
    job = BackgroundJob(stepper(100, step_seconds=0.02, started=reached_step_2)).start()
    assert reached_step_2.wait(5.0)
    job.cancel_job()
    events = drain(job)
    steps = [e.payload for e in events if e.kind is EventKind.PROGRESS]
    assert events[-1].kind is EventKind.CANCELLED and job.state is JobState.CANCELLED
    assert max(steps) <= 3, f"ran on to step {max(steps)} after cancel at step 2"
    assert job.result is None


def test_errors_come_back_as_messages():
    def bad_input(progress, cancel):
        raise MorphSeekError("fixed volume 'x' is 2D")

    def bug(progress, cancel):
        progress("half")
        return 1 / 0

    job = BackgroundJob(bad_input).start()
    events = drain(job)
    assert events[-1].kind is EventKind.FAILED and events[-1].payload == "fixed volume 'x' is 2D"
    job = BackgroundJob(bug).start()
    events = drain(job)
    assert [e.kind for e in events] == [EventKind.PROGRESS, EventKind.FAILED]
    assert job.error.startswith("ZeroDivisionError") and "Traceback" in events[-1].details


def test_cancel_after_the_last_check_still_delivers_nothing():
    release = threading.Event()

    def work(progress, cancel):
        release.wait(5.0)
        return "late result"

    job = BackgroundJob(work).start()
    job.cancel_job()
    release.set()
    events = drain(job)
    assert events[-1].kind is EventKind.CANCELLED and job.result is None
