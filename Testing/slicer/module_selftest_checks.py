"""Run by test_module_load.py through ``slicer_app.py`` with torch available: the module's own
self-test (MorphSeekTest.runTest, what *Reload and Test* and the extension's ctest run) against
Slicer's own base classes. Its registration runs through the worker process started as the panel
starts it (PythonSlicer found on PATH: here a script that runs this Python)."""

import os
import sys
import tempfile
from pathlib import Path

import slicer_app

links = Path(tempfile.mkdtemp(prefix="morphseek-bin-"))
launcher = links / "PythonSlicer"  # a script, not a link: a link would lose this virtual environment
launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
launcher.chmod(0o755)
os.environ["PATH"] = f"{links}{os.pathsep}{os.environ['PATH']}"

slicer = slicer_app.install(tempfile.mkdtemp(prefix="morphseek-app-"))
from MorphSeekLib.offscreen import new_scene  # noqa: E402

new_scene()  # the scene the application would have (colour nodes, slice presets)
module = slicer_app.load_module_file()
assert module.workerLaunch().python == str(links / "PythonSlicer")
test = module.MorphSeekTest()
messages = []
test.delayDisplay = lambda message, *args, **kwargs: messages.append(message)  # the dialog needs Qt
test.runTest()
print("\n".join(messages))
assert messages[-1] == "Test passed", messages
assert "torch" not in sys.modules, "the self-test imported torch into the application's process"
print("SELF-TEST PASSED")
