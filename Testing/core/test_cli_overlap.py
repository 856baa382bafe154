"""`morphseek register` imports torch while the pre-alignment runs: the pieces that make it safe."""

from __future__ import annotations

import subprocess
import sys
import time

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
