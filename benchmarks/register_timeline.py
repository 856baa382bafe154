#!/usr/bin/env python
"""Where one `morphseek register` run's time goes: each stage's start and end, seconds from the start.

    PYTHONPATH=MorphSeekCore python benchmarks/register_timeline.py register --fixed F --moving M \
        --fixed-seg FS --moving-seg MS --model Resources/Models/morphseek-default --out /tmp/out

Runs the command in this process with its stages wrapped (reading, the pre-alignment's child and its
result, torch's import with the model check, the registration, writing) and prints one line per
stage to standard error: (stage, thread, start, end). The interpreter's exit is not included (the
command skips its teardown; this script does not).
"""

import functools
import sys
import threading
import time

T0 = time.perf_counter()
from morphseek import cli, io, prealign  # noqa: E402  (timed from before these imports)

log = []


def timed(function, name):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        start = time.perf_counter() - T0
        try:
            return function(*args, **kwargs)
        finally:
            log.append((name, threading.current_thread().name, round(start, 2), round(time.perf_counter() - T0, 2)))
    return wrapper


io.read_pair = timed(io.read_pair, "reading")
prealign.PrealignInChild.__init__ = timed(prealign.PrealignInChild.__init__, "pre-alignment child started")
prealign.PrealignInChild.result = timed(prealign.PrealignInChild.result, "pre-alignment (waiting for the child)")
prealign.affine_prealign = timed(prealign.affine_prealign, "pre-alignment (in this process)")
load_engine = cli._load_engine


def traced_load(model):
    register_images = load_engine(model)
    from morphseek import register

    register.RegistrationResult.save = timed(register.RegistrationResult.save, "writing")
    return timed(register_images, "registration")


cli._load_engine = timed(traced_load, "torch import + model check")
try:
    code = cli.main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
print(f"end {time.perf_counter() - T0:.2f} s (exit status {code})", file=sys.stderr)
for entry in sorted(log, key=lambda e: e[2]):
    print(entry, file=sys.stderr)
