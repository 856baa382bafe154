"""MorphSeek.py as the desktop application loads it: Slicer v5.10's own ScriptedLoadableModule,
parameterNodeWrapper and i18n on top of slicer-core and vtk, thin qt/ctk import shims, and torch
made unimportable (a fresh Slicer, before PyTorch is installed). The checks are in
module_load_checks.py; they run in a subprocess so that blocking torch affects nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import slicer_app

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(not slicer_app.available(), reason=f"Slicer's Python sources are not in {slicer_app.SLICER_PYTHON}")
def test_module_loads_and_builds_without_torch():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(slicer_app.REPO / "MorphSeekCore"),
                                                       os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, str(HERE / "slicer_app.py"), str(HERE / "module_load_checks.py"),
                                "--no-torch"], capture_output=True, text=True, env=env, timeout=300)
    print(completed.stdout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "ALL CHECKS PASSED" in completed.stdout


@pytest.mark.skipif(not slicer_app.available(), reason=f"Slicer's Python sources are not in {slicer_app.SLICER_PYTHON}")
def test_module_self_test_runs_its_registration_in_the_worker():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(slicer_app.REPO / "MorphSeekCore"),
                                                       os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, str(HERE / "slicer_app.py"), str(HERE / "module_selftest_checks.py")],
                               capture_output=True, text=True, env=env, timeout=600)
    print(completed.stdout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "SELF-TEST PASSED" in completed.stdout


@pytest.mark.skipif(not slicer_app.available(), reason=f"Slicer's Python sources are not in {slicer_app.SLICER_PYTHON}")
def test_widget_logic_fixes_of_the_review():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(slicer_app.REPO / "MorphSeekCore"),
                                                       os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, str(HERE / "slicer_app.py"), str(HERE / "module_widget_checks.py"),
                                "--no-torch"], capture_output=True, text=True, env=env, timeout=300)
    print(completed.stdout)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "WIDGET CHECKS PASSED" in completed.stdout
