"""`morphseek register` imports torch while the pre-alignment runs: the pieces that make it safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from morphseek import cli, prealign
from morphseek.errors import MorphSeekError


def test_reading_checking_and_prealigning_need_no_torch():
    """What runs before the engine is loaded must not import torch, or nothing overlaps."""
    code = ("import sys; import morphseek.io, morphseek.prealign, morphseek.outputs, morphseek.checkpoint_names; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_background_returns_the_value_and_raises_the_error():
    assert cli._Background(lambda x: x * 2, 21).result() == 42
    failing = cli._Background(lambda: (_ for _ in ()).throw(MorphSeekError("checkpoint x: bad")))
    deadline = time.monotonic() + 5
    while not failing.failed() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert failing.failed()
    with pytest.raises(MorphSeekError, match="checkpoint x: bad"):
        failing.result()


def test_a_failing_load_stops_the_prealignment_at_once():
    """``also_stop`` reaches the pre-alignment's optimiser: it stops at its next iteration."""
    image = sitk.GaussianSource(sitk.sitkFloat32, [64, 64, 64], sigma=[12, 10, 8], mean=[30, 32, 34])
    moving = sitk.GaussianSource(sitk.sitkFloat32, [64, 64, 64], sigma=[12, 10, 8], mean=[34, 30, 32])
    start = time.perf_counter()
    with pytest.raises(prealign.Cancelled):
        cli._interruptible(prealign.affine_prealign, image, moving, also_stop=lambda: True)
    assert time.perf_counter() - start < 5.0


def test_a_bad_model_is_reported_during_the_prealignment_and_nothing_is_written(tmp_path, capsys):
    fixed = sitk.GaussianSource(sitk.sitkFloat32, [64, 64, 64], sigma=[12, 10, 8], mean=[30, 32, 34])
    moving = sitk.GaussianSource(sitk.sitkFloat32, [64, 64, 64], sigma=[12, 10, 8], mean=[34, 30, 32])
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00" * 300)
    out = tmp_path / "out"
    status = cli.main(["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz"),
                       "--model", str(garbage), "--out", str(out), "--prealign", "affine", "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and str(garbage) in err and "cannot be read" in err, err
    assert not out.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pre-alignment forks only on Linux")
def test_the_command_pre_aligns_in_a_child_process_and_gets_its_transform(tmp_path):
    """A fresh `morphseek register` takes the child path (a silent fall-back would lose its speed)
    and registers with the child's transform."""
    fixed = sitk.GaussianSource(sitk.sitkFloat32, [40, 40, 40], sigma=[9, 8, 7], mean=[19, 20, 21])
    moving = sitk.GaussianSource(sitk.sitkFloat32, [40, 40, 40], sigma=[9, 8, 7], mean=[21, 19, 20])
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    code = ("import json, sys; from morphseek import cli, prealign\n"
            "result = prealign.PrealignInChild.result\n"
            "def traced(self, *a, **k):\n"
            "    found = result(self, *a, **k); print('CHILD', json.dumps(found.GetParameters()), flush=True); return found\n"
            "prealign.PrealignInChild.result = traced\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    model = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "morphseek-default"
    done = subprocess.run([sys.executable, "-c", code, "register", "--fixed", str(tmp_path / "fixed.nii.gz"),
                           "--moving", str(tmp_path / "moving.nii.gz"), "--model", str(model), "--steps", "1",
                           "--out", str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("CHILD")]
    assert len(line) == 1, done.stdout
    expected = prealign.affine_prealign(fixed, moving)
    assert json.loads(line[0][len("CHILD"):]) == list(expected.GetParameters())


def test_the_command_leaves_quickly_with_its_output_and_exit_status_whole(tmp_path):
    """`python -m morphseek` skips the interpreter's teardown once a command is through (cli.run):
    what it printed still arrives whole through a pipe (fully buffered there), the outputs are
    complete, and the exit status is the command's, on success and on a bad input."""
    fixed = sitk.GaussianSource(sitk.sitkFloat32, [40, 40, 40], sigma=[9, 8, 7], mean=[19, 20, 21])
    moving = sitk.GaussianSource(sitk.sitkFloat32, [40, 40, 40], sigma=[9, 8, 7], mean=[21, 19, 20])
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    model = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "morphseek-default"
    argv = [sys.executable, "-m", "morphseek", "register", "--fixed", str(tmp_path / "fixed.nii.gz"),
            "--moving", str(tmp_path / "moving.nii.gz"), "--model", str(model), "--steps", "2",
            "--prealign", "none", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as for most users
    done = subprocess.run(argv + ["--out", str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith(f"wrote {tmp_path / 'out'}"), done.stdout
    assert [l.split()[0] for l in done.stdout.splitlines() if l.split()[:1] in (["1"], ["2"])] == ["1", "2"], done.stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["steps"]) == 2
    assert sitk.ReadImage(str(tmp_path / "out" / "warped.nii.gz")).GetSize() == (40, 40, 40)

    bad = subprocess.run(argv[:5] + [str(tmp_path / "missing.nii.gz")] + argv[6:] + ["--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "missing.nii.gz" in bad.stderr, bad.stderr
