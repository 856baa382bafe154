"""The real worker (``morphseek.worker.main``) with one of its stages made to hang or fail, for the
cancel and failure tests: ``python hold_worker.py STAGE JOB.json``.

STAGE: ``loading`` (the model), ``prealign`` (the affine pre-alignment), ``step`` (inside the
network's first refinement step), ``export`` (writing step 2's files, after step 1 was reported),
each hanging there after printing ``HOLD <stage>`` to standard error, as a slow stage would; or
inside the first step: ``raise`` (an unexpected exception), ``oom`` (MemoryError, as a failed CPU
allocation), ``crash`` (the process dies of SIGSEGV, as on a fault in native code); or
``corrupt`` (step 1's warped image is garbage on disk when the step is announced)."""

import os
import signal
import sys
import time

stage, job = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.getcwd())  # the worker runs in the engine's folder (as ``python -m`` would see it)

import morphseek.geometry  # noqa: E402
import morphseek.io  # noqa: E402
import morphseek.register  # noqa: E402
import morphseek.worker  # noqa: E402


def held(original, calls_before: int = 0):
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] > calls_before:
            print(f"HOLD {stage}", file=sys.stderr, flush=True)
            time.sleep(600)
        return original(*args, **kwargs)

    return wrapper


def failing(*args, **kwargs):
    raise ValueError("injected failure inside a refinement step")


def out_of_memory(*args, **kwargs):
    raise MemoryError()


def crashing(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(60)


def corrupting(original):
    def wrapper(record, folder):
        files = original(record, folder)
        with open(files["warped"], "wb") as stream:
            stream.write(b"NRRD0004\ngarbage")
        return files

    return wrapper


if stage == "loading":
    morphseek.register.load_model = held(morphseek.register.load_model)
elif stage == "prealign":
    import morphseek.prealign

    morphseek.prealign.affine_prealign = held(morphseek.prealign.affine_prealign)
elif stage == "step":
    morphseek.geometry.compose = held(morphseek.geometry.compose)
elif stage == "export":
    morphseek.worker.write_step_files = held(morphseek.worker.write_step_files, calls_before=1)
elif stage == "raise":
    morphseek.geometry.compose = failing
elif stage == "oom":
    morphseek.geometry.compose = out_of_memory
elif stage == "crash":
    morphseek.geometry.compose = crashing
elif stage == "corrupt":
    morphseek.worker.write_step_files = corrupting(morphseek.worker.write_step_files)
else:
    raise SystemExit(f"unknown stage {stage!r}")
sys.exit(morphseek.worker.main([job]))
