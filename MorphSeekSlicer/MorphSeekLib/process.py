"""The MorphSeek worker as a child process, seen from the GUI: start ``python -m morphseek.worker
JOB.json``, read its JSON lines in reader threads into a queue, hand them out on ``events()`` (the
widget calls it from a QTimer on the main thread), and kill the whole process tree on ``cancel()``.

Why a process and not a thread: Slicer's main thread holds Python's GIL except while it runs Python,
so a worker thread would only progress between GUI events; a process runs at full speed, can be
stopped at any moment (also inside the affine pre-alignment or while a model loads), and a crash or
an out-of-memory kill in torch cannot take Slicer down.

No Qt and no Slicer here: inside Slicer the caller passes Slicer's own Python (``sys.executable``,
i.e. PythonSlicer) and its start-up environment (``slicer.util.startupEnvironment()``), as
SlicerMONAIAuto3DSeg does for its inference process.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

WORKER_MODULE = "morphseek.worker"
TERMINAL_EVENTS = ("done", "error")
STDERR_TAIL_LINES = 40


@dataclass
class WorkerEvent:
    """One line of the worker: ``event`` is the protocol's event name (``started``, ``progress``,
    ``step``, ``done``, ``error``; ``log`` for a line of standard error or a non-protocol line)."""

    event: str
    data: dict = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL_EVENTS


def engine_folder() -> Path:
    """The folder that holds the ``morphseek`` package (found without importing it)."""
    spec = importlib.util.find_spec("morphseek")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the MorphSeek engine (the 'morphseek' package) was not found on Python's path")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def describe_exit(returncode: int) -> str:
    """What an exit status means to a user."""
    if returncode < 0:  # POSIX: killed by a signal
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if -returncode == getattr(signal, "SIGKILL", 9):
            return (f"was killed ({name}): the computer may have run out of memory (try fewer candidates or a "
                    "smaller model grid, or close other programs), or another program stopped it")
        if name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGABRT", "SIGFPE"):
            return f"crashed ({name}, an error in native code such as PyTorch or a GPU driver)"
        return f"was stopped by {name}"
    if sys.platform == "win32" and returncode >= 0xC0000000:
        return f"crashed (Windows error 0x{returncode:08X})"
    return f"exited with code {returncode} before reporting a result"


class WorkerProcess:
    """One run of the worker. ``start()``, then ``events()`` until one is terminal (``done`` or
    ``error``; a worker that dies without saying so gets an ``error`` event describing how it died,
    with the last lines of its standard error). ``cancel()`` kills the process tree."""

    def __init__(self, job_path: str | Path, *, python: str | None = None, env: dict | None = None,
                 engine_dir: str | Path | None = None, command: Sequence[str] | None = None):
        self.job_path = Path(job_path)
        self.python = python or sys.executable
        self.env = dict(os.environ if env is None else env)
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.setdefault("PYTHONIOENCODING", "utf-8")
        self.cwd = Path(engine_dir) if engine_dir is not None else None
        # ``python -m`` puts the working folder first on sys.path: the engine next to the module is
        # found without touching PYTHONPATH (which Slicer's launcher manages).
        self.command = list(command) if command is not None else [self.python, "-m", WORKER_MODULE, str(self.job_path)]
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._queue: queue.Queue[WorkerEvent] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._terminal_seen = threading.Event()
        self._finished = False

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> "WorkerProcess":
        cwd = self.cwd if self.cwd is not None else engine_folder()
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True  # its own process group: cancel kills it and its children
        self.process = subprocess.Popen(self.command, cwd=str(cwd), env=self.env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        encoding="utf-8", errors="replace", bufsize=1, **options)
        stdout_reader = threading.Thread(target=self._read_stdout, name="MorphSeek worker stdout", daemon=True)
        stderr_reader = threading.Thread(target=self._read_stderr, name="MorphSeek worker stderr", daemon=True)
        self._threads = [stderr_reader, stdout_reader]
        stderr_reader.start()
        stdout_reader.start()
        return self

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def cancel(self, timeout: float = 0.5) -> bool:
        """Kill the worker and every process it started (SIGKILL: none of them runs another
        instruction); True when the worker has also exited within ``timeout`` seconds. The
        caller is never held longer: on a loaded machine the system may need a moment more to
        tear a large process down, and the reader thread reaps it then. Events still queued are
        dropped: the caller wanted nothing more."""
        self.cancelled = True
        if self.process is None:
            return True
        if self.process.poll() is None:
            self._kill_tree()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _kill_tree(self) -> None:
        pid = self.process.pid
        if os.name == "nt":
            # taskkill /T ends the children too; it needs no extra package.
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW)
            return
        try:
            os.killpg(pid, signal.SIGKILL)  # the group started with the worker (start_new_session)
        except (ProcessLookupError, PermissionError):
            self.process.kill()

    # -- events ----------------------------------------------------------------------------------
    def events(self) -> list[WorkerEvent]:
        """Events since the last call, in order (non-blocking). Nothing after a cancel."""
        events = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if not self.cancelled:
                events.append(event)
        return events

    def wait_for_events(self, timeout: float) -> list[WorkerEvent]:
        """Block up to ``timeout`` seconds for at least one event (for scripts and tests)."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        return ([first] if not self.cancelled else []) + self.events()

    def run_to_end(self, timeout: float = 600.0) -> list[WorkerEvent]:
        """Every event until the terminal one (synchronous use from a script)."""
        events, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            events += self.wait_for_events(0.1)
            if events and events[-1].terminal:
                return events
        self.cancel()
        raise TimeoutError(f"the MorphSeek worker did not finish within {timeout:.0f} s")

    # -- reader threads ----------------------------------------------------------------------------
    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\r\n")
            if not line:
                continue
            event = parse_line(line)
            if event.terminal:
                self._terminal_seen.set()
            self._queue.put(event)
        self.process.wait()
        # The last words on standard error explain a crash: let that reader finish first.
        self._threads[0].join(2.0)
        if not self._terminal_seen.is_set() and not self.cancelled:
            tail = "\n".join(self.stderr_tail)
            message = f"the MorphSeek worker {describe_exit(self.process.returncode)}"
            last = next((l for l in reversed(self.stderr_tail) if l.strip()), "")
            if last:
                message += f"; its last message: {last.strip()}"
            self._queue.put(WorkerEvent("error", {"error": "crashed", "message": message, "traceback": tail,
                                                  "returncode": self.process.returncode}))

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip("\r\n")
            self.stderr_tail.append(line)
            if line:
                self._queue.put(WorkerEvent("log", {"text": line, "stream": "stderr"}))


def parse_line(line: str) -> WorkerEvent:
    """A protocol line as an event; anything that is not a protocol object becomes a ``log`` event."""
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("event"), str):
            return WorkerEvent(data.pop("event"), data)
    return WorkerEvent("log", {"text": line, "stream": "stdout"})
