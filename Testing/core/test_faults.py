"""Bad inputs and faults (issue 10): every case is made by the test, and each asserts the exit status,
that the message names the user's file (or option) and says what to do, and that nothing else changed
on disk. Then: outputs whole or absent (disk full, out of memory, Ctrl-C), SIGKILL-and-resume
bit-identical to an uninterrupted run, and checkpoints that never run code."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from morphseek import cli, io
from morphseek.checkpoint import checkpoint_files, load_checkpoint, save_checkpoint
from morphseek.errors import MorphSeekError
from morphseek.nets.registry import build_model
from morphseek.outputs import MARKER

CORE = Path(__file__).resolve().parents[2] / "MorphSeekCore"
GRID = [32, 32, 32]


# ------------------------------------------------------------------------------------------ helpers
def volume(shape=(20, 22, 24), seed=0, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    """A smooth random volume (array order D, H, W) with contrast."""
    rng = np.random.default_rng(seed)
    array = rng.random(shape).astype(np.float32)
    if min(shape) >= 4:
        array = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(array), 2.0))
    image = sitk.GetImageFromArray((array - array.min()) / (np.ptp(array) + 1e-6) * 100)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def labels_like(image: sitk.Image, values=(1, 2)) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    labels = np.zeros(array.shape, np.int16)
    labels[array > np.percentile(array, 50)] = values[0]
    labels[array > np.percentile(array, 80)] = values[1]
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


def write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), True)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) -> its SHA-256: 'nothing else changed'."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture()
def workspace(tmp_path):
    """Inputs of a registration, made here: images, segmentations, a tiny model."""
    fixed, moving = volume(seed=1), volume(seed=2)
    paths = {
        "fixed": write(fixed, tmp_path / "fixed.nii.gz"),
        "moving": write(moving, tmp_path / "moving.nii.gz"),
        "fixed_seg": write(labels_like(fixed), tmp_path / "fixed_seg.nii.gz"),
        "moving_seg": write(labels_like(moving), tmp_path / "moving_seg.nii.gz"),
    }
    torch.manual_seed(0)
    paths["model"] = save_checkpoint(tmp_path / "tiny", build_model({"backbone": "tiny"}),
                                     {"grid": GRID, "similarity": "mse", "percentiles": [1.0, 99.0]})
    return tmp_path, paths


def register_argv(paths, out, *extra, prealign="none"):
    return ["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
            "--model", str(paths["model"]), "--out", str(out), "--steps", "1", "--device", "cpu",
            "--prealign", prealign, *extra]


def run_cli(argv, capsys) -> tuple[int, str]:
    """Run ``morphseek`` in-process -> (exit status, stderr); argparse errors exit 2 as SystemExit."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------ the table of bad inputs
def _truncate(path: Path, fraction=0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _flip_gzip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def case_truncated_nii_gz(root, p):
    _truncate(p["fixed"])
    return register_argv(p, root / "out"), str(p["fixed"]), "cut short"


def case_truncated_nii(root, p):
    plain = write(volume(seed=2), root / "moving_plain.nii")
    _truncate(plain, 0.7)
    return register_argv({**p, "moving": plain}, root / "out"), str(plain), "cut short"


def case_gzip_crc_error(root, p):
    _flip_gzip_byte(p["moving"])
    return register_argv(p, root / "out"), str(p["moving"]), "corrupt"


def case_empty_file(root, p):
    p["fixed"].write_bytes(b"")
    return register_argv(p, root / "out"), str(p["fixed"]), "cannot read"


def case_text_file_named_nifti(root, p):
    p["moving"].write_text("patient notes, not an image\n" * 20)
    return register_argv(p, root / "out"), str(p["moving"]), "cannot read"


def case_missing_image(root, p):
    return register_argv({**p, "moving": root / "no_such.nii.gz"}, root / "out"), "no_such.nii.gz", "not found"


def case_folder_as_image(root, p):
    folder = root / "a_folder.nii.gz"
    folder.mkdir()
    return register_argv({**p, "fixed": folder}, root / "out"), str(folder), "folder"


def case_tiny_volume(root, p):
    tiny = write(volume(shape=(3, 3, 3), seed=3), root / "tiny.nii.gz")
    return register_argv({**p, "fixed": tiny}, root / "out"), str(tiny), "too small"


def case_2d_image(root, p):
    flat = root / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(30, 30).astype(np.float32)), str(flat))
    return register_argv({**p, "fixed": flat}, root / "out"), str(flat), "3D volume is needed"


def case_constant_image(root, p):
    constant = root / "constant.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((20, 20, 20), 7, np.float32)), str(constant))
    return register_argv({**p, "moving": constant}, root / "out"), str(constant), "constant"


def case_nan_image(root, p):
    array = sitk.GetArrayFromImage(volume(seed=4))
    array[3, 3, 3] = np.nan
    bad = root / "nan.mha"  # (ITK reads NaN in NIfTI as 0)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(bad))
    return register_argv({**p, "moving": bad}, root / "out"), str(bad), "NaN"


def case_negative_labels(root, p):
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(p["fixed_seg"])))
    image = sitk.GetImageFromArray(-seg.astype(np.int16))
    image.CopyInformation(sitk.ReadImage(str(p["fixed"])))
    bad = write(image, root / "negative_seg.nii.gz")
    argv = register_argv(p, root / "out", "--fixed-seg", bad, "--moving-seg", p["moving_seg"])
    return argv, str(bad), "negative label"


def case_labels_on_another_grid(root, p):
    other = write(labels_like(volume(shape=(20, 22, 25), seed=5)), root / "other_grid_seg.nii.gz")
    argv = register_argv(p, root / "out", "--fixed-seg", other, "--moving-seg", p["moving_seg"])
    return argv, str(p["fixed"]), "not on the grid"  # names the seg AND the image (not "reference image")


def case_labels_share_nothing(root, p):
    fixed = sitk.ReadImage(str(p["fixed"]))
    other = write(labels_like(fixed, values=(7, 8)), root / "other_labels_seg.nii.gz")
    argv = register_argv(p, root / "out", "--fixed-seg", other, "--moving-seg", p["moving_seg"])
    return argv, str(other), "share no label"


def case_no_overlap(root, p):
    far = write(volume(seed=6, origin=(500.0, 0.0, 0.0)), root / "far_away.nii.gz")
    return register_argv({**p, "moving": far}, root / "out"), str(far), "do not overlap"


def case_missing_model(root, p):
    return register_argv({**p, "model": root / "nowhere.safetensors"}, root / "out"), "nowhere.safetensors", "not found"


def case_garbage_model(root, p):
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(os.urandom(300))
    return register_argv({**p, "model": garbage}, root / "out"), str(garbage), "cannot be read"


def case_malicious_pickle_model(root, p):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(root / "PWNED"),))

    evil = root / "evil.pt"
    torch.save({"format_version": 1, "payload": Payload()}, evil)
    return register_argv({**p, "model": evil}, root / "out"), str(evil), "could run code"


def case_model_with_bad_grid(root, p):
    bad = save_checkpoint(root / "badgrid", build_model({"backbone": "tiny"}), {"grid": [30, 30, 30]})
    return register_argv({**p, "model": bad}, root / "out"), str(bad), "multiples of 16"


def case_fine_steps_with_a_fixed_grid_model(root, p):
    return register_argv(p, root / "out", "--fine-steps", "1"), str(p["model"]), "--fine-steps 0"


def case_out_is_a_file(root, p):
    out = root / "result.txt"
    out.write_text("keep me")
    return register_argv(p, out), str(out), "existing file"


def case_out_is_someone_elses_folder(root, p):
    out = root / "documents"
    out.mkdir()
    (out / "thesis.docx").write_text("years of work")
    return register_argv(p, out, "--overwrite"), str(out), "did not write"


def case_out_holds_a_result_no_overwrite(root, p):
    out = root / "previous"
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "report.json").write_text("{}")
    return register_argv(p, out), str(out), "--overwrite"


def case_input_inside_out(root, p):
    return register_argv(p, root, "--overwrite"), str(root), "would replace the input"


def case_out_under_a_file(root, p):
    blocker = root / "blocker"
    blocker.write_text("x")
    return register_argv(p, blocker / "sub" / "out"), str(blocker), "is a file"


def case_too_large_for_memory(root, p, monkeypatch=None):
    return register_argv(p, root / "out"), str(p["fixed"]), "too large for the memory"


REGISTER_CASES = [
    case_truncated_nii_gz, case_truncated_nii, case_gzip_crc_error, case_empty_file, case_text_file_named_nifti,
    case_missing_image, case_folder_as_image, case_tiny_volume, case_2d_image, case_constant_image, case_nan_image,
    case_negative_labels, case_labels_on_another_grid, case_labels_share_nothing, case_no_overlap,
    case_missing_model, case_garbage_model, case_malicious_pickle_model, case_model_with_bad_grid,
    case_fine_steps_with_a_fixed_grid_model, case_out_is_a_file, case_out_is_someone_elses_folder, case_out_holds_a_result_no_overwrite,
    case_input_inside_out, case_out_under_a_file, case_too_large_for_memory,
]


@pytest.mark.parametrize("case", REGISTER_CASES, ids=[c.__name__[5:] for c in REGISTER_CASES])
def test_register_bad_input_is_one_clear_error_and_changes_nothing(case, workspace, capsys, monkeypatch):
    root, paths = workspace
    argv, names, says = case(root, paths)
    if case is case_too_large_for_memory:
        monkeypatch.setattr(io, "available_memory", lambda: 1 << 20)  # a machine with 1 MiB free (the images need ~2)
    before = snapshot(root)
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert names in err and says in err, err
    assert err.count("\n") <= 2 and "Traceback" not in err  # one line, no traceback
    assert "weights_only" not in err
    assert snapshot(root) == before  # nothing written, nothing removed, no temporary folder left
    assert not (root / "PWNED").exists()


# ------------------------------------------------------------------------ numeric options, parse time
NUMERIC_CASES = [
    ("warmup", ["--iterations", "0"], "--iterations"),
    ("warmup", ["--checkpoint-every", "0"], "--checkpoint-every"),
    ("warmup", ["--lr", "-1"], "--lr"),
    ("warmup", ["--lr", "nan"], "--lr"),
    ("warmup", ["--lr", "inf"], "--lr"),
    ("warmup", ["--beta-kl", "-0.1"], "--beta-kl"),
    ("warmup", ["--lambda-reg", "nan"], "--lambda-reg"),
    ("warmup", ["--grid", "3"], "--grid"),
    ("warmup", ["--grid", "64,64"], "--grid"),
    ("warmup", ["--grid", "abc"], "--grid"),
    ("warmup", ["--seed", "-1"], "--seed"),
    ("register", ["--steps", "0"], "--steps"),
    ("register", ["--trajectories", "0"], "--trajectories"),
    ("register", ["--tau", "nan"], "--tau"),
    ("register", ["--tau", "-0.5"], "--tau"),
    ("evaluate", ["--steps", "-2"], "--steps"),
    ("finetune", ["--trajectories", "1"], "--trajectories"),
    ("finetune", ["--episodes", "0"], "--episodes"),
    ("finetune", ["--lr", "0"], "--lr"),
    ("finetune", ["--tau", "0"], "--tau"),
    ("finetune", ["--w-njd", "5"], "--w-njd"),
    ("finetune", ["--lambda-reg", "-1"], "--lambda-reg"),
    ("demo", ["--steps", "0"], "--steps"),
    ("demo", ["--episodes", "-1"], "--episodes"),
    ("demo", ["--adapt", "-3"], "--adapt"),
    ("demo", ["--trajectories", "1"], "--trajectories"),
    ("register", ["--adapt", "-1"], "--adapt"),
    ("register", ["--adapt-lambda", "-1"], "--adapt-lambda"),
    ("register", ["--fine-steps", "-1"], "--fine-steps"),
    ("register", ["--precision", "fp16"], "--precision"),
    ("evaluate", ["--precision", "half"], "--precision"),
]
REQUIRED = {"warmup": ["--data", "d", "--out", "o"], "register": ["--fixed", "f", "--moving", "m", "--model", "x",
            "--out", "o"], "evaluate": ["--data", "d", "--model", "x", "--out", "o"],
            "finetune": ["--model", "x", "--data", "d", "--out", "o"], "demo": ["--out", "o"]}


@pytest.mark.parametrize("command,option,name", NUMERIC_CASES, ids=[f"{c}{' '.join(o)}" for c, o, _ in NUMERIC_CASES])
def test_numeric_options_are_checked_when_parsed(command, option, name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli([command, *REQUIRED[command], *option], capsys)
    assert code == 2 and name in err and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())  # refused before anything was read or written


# ------------------------------------------------------------------------ training --out
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from morphseek.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synth"), n_subjects=6, shape=tuple(GRID), seed=3)


def warmup_argv(data, out, *extra):
    return ["warmup", "--data", str(data), "--out", str(out), "--backbone", "tiny", "--grid", "32",
            "--iterations", "2", "--device", "cpu", *extra]


def test_training_out_never_replaces_a_checkpoint_or_an_input(dataset, tmp_path, capsys):
    data_folder = Path(dataset).parent
    out = tmp_path / "warm.safetensors"
    assert run_cli(warmup_argv(dataset, out), capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warm.json", "warm.log.csv", "warm.log.jsonl", "warm.safetensors"]
    before, data_before = snapshot(tmp_path), snapshot(data_folder)

    # an existing checkpoint (another run's trained model) is refused without --resume / --overwrite
    code, err = run_cli(warmup_argv(dataset, tmp_path / "warm.pt"), capsys)
    assert code == 2 and "warm.pt" in err and "already holds a checkpoint" in err and "--resume" in err
    # resuming it with other settings is another run: refused, named
    code, err = run_cli(warmup_argv(dataset, out, "--resume", "--seed", "5"), capsys)
    assert code == 2 and "warm.safetensors" in err and "another run" in err and "seed" in err
    # a checkpoint name whose .json would replace the dataset manifest
    code, err = run_cli(warmup_argv(dataset, Path(dataset).with_suffix(".pt")), capsys)
    assert code == 2 and "would overwrite the input" in err and str(dataset) in err
    # a grid the backbone cannot take, before any data is read
    code, err = run_cli(warmup_argv(dataset, tmp_path / "other", "--grid", "40"), capsys)
    assert code == 2 and "--grid" in err and "multiple of 16" in err
    # fine-tuning onto its own starting model
    code, err = run_cli(["finetune", "--model", str(out), "--data", str(dataset), "--out", str(tmp_path / "warm"),
                         "--device", "cpu", "--no-progress"], capsys)
    assert code == 2 and "would overwrite the input" in err
    assert snapshot(tmp_path) == before and snapshot(data_folder) == data_before

    # --overwrite replaces it, --resume continues it
    assert run_cli(warmup_argv(dataset, out, "--overwrite", "--iterations", "1"), capsys)[0] == 0
    assert load_checkpoint(out)[2]["state"]["iteration"] == 1
    assert run_cli(warmup_argv(dataset, out, "--resume", "--iterations", "3"), capsys)[0] == 0
    assert load_checkpoint(out)[2]["state"]["iteration"] == 3


def test_resuming_a_warm_up_with_another_presmoothing_is_another_run(tmp_path):
    """The presmoothing is part of the warm-up's objective: a checkpoint trained with it is not
    continued without it (or with another sigma), as for the other settings of RUN_IDENTITY."""
    from morphseek.train.warmup import WarmupConfig, _check_same_run

    model = build_model({"backbone": "tiny"})
    saved = WarmupConfig(grid=(32, 32, 32), similarity="ncc", presmooth=1.0).run_config()
    _check_same_run(tmp_path / "warm", saved, model.config, WarmupConfig(grid=(32, 32, 32), similarity="ncc",
                                                                       presmooth=1.0), model)
    with pytest.raises(MorphSeekError, match=r"another run: presmooth 1\.0 \(now 0\.0\)"):
        _check_same_run(tmp_path / "warm", saved, model.config, WarmupConfig(grid=(32, 32, 32), similarity="ncc"),
                        model)


# ------------------------------------------------------------------------ outputs whole or absent
@pytest.fixture()
def result(workspace):
    from morphseek.register import register_images

    root, paths = workspace
    fixed, moving = io.read_image(paths["fixed"]), io.read_image(paths["moving"])
    return register_images(fixed, moving, paths["model"], steps=2, prealign="none", device="cpu")


def test_rerun_replaces_the_result_as_a_whole(result, workspace):
    root, _ = workspace
    out = root / "reg"
    result.save(out)
    assert (out / "step_02" / "warped.nii.gz").is_file() and (out / MARKER).is_file()
    with pytest.raises(MorphSeekError, match=r"reg.*already holds a result.*--overwrite"):
        result.save(out)
    result.steps = result.steps[:1]  # a rerun with fewer steps
    result.save(out, overwrite=True)
    assert not (out / "step_02").exists()  # nothing of the older run is left beside the new files
    assert json.loads((out / "report.json").read_text())["final"]["step"] == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".reg.")]  # no temporary folder left


def test_disk_full_while_writing_leaves_the_previous_result(result, workspace, monkeypatch):
    root, _ = workspace
    out = root / "reg"
    result.save(out)
    before = snapshot(out)
    real_write = sitk.WriteImage

    def short_write(image, path, *args):  # what a full disk does to a NIfTI writer: a file cut short
        real_write(image, path, *args)
        if "jacobian" in str(path):
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 3])

    monkeypatch.setattr(io.sitk, "WriteImage", short_write)
    with pytest.raises(MorphSeekError, match=r"jacobian\.nii\.gz.*(incomplete|corrupt|cut short)"):
        result.save(out, overwrite=True)
    assert snapshot(out) == before  # the previous result, whole
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    # and to a new folder: nothing at all
    with pytest.raises(MorphSeekError, match="disk full"):
        result.save(root / "fresh")
    assert not (root / "fresh").exists()


@pytest.mark.parametrize("fault", ["cut short", "zeroed", "other field"])
def test_a_bad_transform_h5_write_is_caught_by_reading_it_back(result, workspace, monkeypatch, fault):
    """transform.h5 is read back and compared with the field value by value before it takes its
    name: a file cut short (full disk), zeroed blocks, or a readable file holding another field are
    errors naming the file, and the previous result stays whole."""
    from morphseek import export

    root, _ = workspace
    out = root / "reg"
    result.save(out)
    before = snapshot(out)
    real_write = export._write_field_h5

    def bad_write(values, fixed_parameters, path):
        if fault == "other field":  # a readable .h5 whose displacement is off by 0.5 mm at one value
            values = values.copy()
            values[-1] += 0.5
        real_write(values, fixed_parameters, path)
        data = bytearray(Path(path).read_bytes())
        if fault == "cut short":
            Path(path).write_bytes(bytes(data[: len(data) * 2 // 3]))
        elif fault == "zeroed":  # the tail of the file never reached the disk
            data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
            Path(path).write_bytes(bytes(data))

    monkeypatch.setattr(export, "_write_field_h5", bad_write)
    with pytest.raises(MorphSeekError, match=r"cannot write transform '.*transform\.h5'"):
        result.save(out, overwrite=True)
    assert snapshot(out) == before  # the previous result, whole
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(MorphSeekError, match=r"cannot write transform '.*alone\.h5'.*(unreadable|other values)"):
        export.write_transform(result.field, root / "alone.h5")
    assert not (root / "alone.h5").exists() and not [p for p in root.iterdir() if p.name.startswith(".alone")]


def test_a_written_transform_h5_passes_its_check_and_maps_like_the_field(result, tmp_path):
    from morphseek import export

    path = export.write_transform(result.field, tmp_path / "t.h5")
    read = sitk.ReadTransform(str(path))
    from morphseek import outputs

    points = outputs.probe_points(export.displacement_transform(result.field))
    assert len(points) == 8 + 1 + outputs.VERIFY_RANDOM_POINTS
    field = sitk.GetArrayFromImage(result.field)
    # ITK reads back exactly the field and its grid (our h5py writer uses ITK's layout)
    stored = read.Downcast().GetDisplacementField()
    assert stored.GetSize() == result.field.GetSize() and stored.GetOrigin() == result.field.GetOrigin()
    assert stored.GetSpacing() == result.field.GetSpacing() and stored.GetDirection() == result.field.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), field.astype(np.float64))
    # the same file as ITK's own writer makes, value for value
    itk_written = tmp_path / "itk.h5"
    sitk.WriteTransform(export.displacement_transform(result.field), str(itk_written))
    np.testing.assert_array_equal(sitk.ReadTransform(str(itk_written)).GetParameters(), read.GetParameters())
    np.testing.assert_array_equal(sitk.ReadTransform(str(itk_written)).GetFixedParameters(), read.GetFixedParameters())
    for index in ((0, 0, 0), (3, 5, 7), tuple(n - 1 for n in result.field.GetSize())):
        x = np.asarray(result.field.TransformIndexToPhysicalPoint(index))
        u = field[index[::-1]]
        np.testing.assert_allclose(read.TransformPoint(tuple(x)), x + u, atol=1e-6)


def test_out_of_memory_and_ctrl_c_during_register_write_nothing(workspace, capsys, monkeypatch):
    from morphseek import register

    root, paths = workspace
    for error, code, says in ((torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB"), 2,
                               "out of memory"),
                              (MemoryError(), 2, "out of memory"),
                              (KeyboardInterrupt(), 130, "interrupted; nothing was written")):
        def fail(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(register, "register_images", fail)
        before = snapshot(root)
        status, err = run_cli(register_argv(paths, root / "out"), capsys)
        assert status == code and says in err and "checkpoint" not in err, err
        assert snapshot(root) == before


def test_disk_full_in_a_plain_writer_is_one_line_and_leaves_no_folder(workspace, capsys, monkeypatch):
    """evaluate's JSON/CSV are written with plain open(): an OSError there is still one clear line,
    and the staged folder is removed."""
    from morphseek import evaluate

    root, paths = workspace

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(root / "eval" / "evaluation.json"))

    monkeypatch.setattr(evaluate, "evaluate_dataset", full_disk)
    data = root / "data.json"
    data.write_text(json.dumps({"format": "morphseek-dataset", "subjects": [{"id": "f", "image": str(paths["fixed"]), "labels": str(paths["fixed_seg"])},
                                             {"id": "m", "image": str(paths["moving"]), "labels": str(paths["moving_seg"])}]}))
    before = snapshot(root)
    code, err = run_cli(["evaluate", "--data", data, "--model", paths["model"], "--out", root / "eval",
                         "--device", "cpu", "--all"], capsys)
    assert code == 2 and "No space left on device" in err and "evaluation.json" in err, err
    assert "Traceback" not in err and snapshot(root) == before


def test_demo_refuses_settings_that_give_no_result(tmp_path):
    from morphseek.demo import run_demo

    for kwargs, says in (({"steps": 0}, "steps >= 1"), ({"episodes": 2, "trajectories": 1}, "trajectories >= 2"),
                         ({"model": tmp_path / "no_model"}, "no_model: the brain model is missing"),
                         ({"model": tmp_path / "no_model.safetensors"}, "no_model.safetensors")):
        with pytest.raises(MorphSeekError, match=says):
            run_demo(tmp_path / "demo", **kwargs)
    assert not list(tmp_path.iterdir())


def test_writes_are_checked_and_reads_detect_truncation(tmp_path):
    image = volume()
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        path = io.write_image(image, tmp_path / f"v{suffix}")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_image(path)), sitk.GetArrayFromImage(image))
        _truncate(path, 0.6)
        with pytest.raises(MorphSeekError, match=f"v{suffix}"):
            io.read_image(path)
    # a gzip stream that is whole but holds fewer voxels than its header promises
    whole = io.write_image(image, tmp_path / "whole.nii.gz")
    raw = gzip.decompress(whole.read_bytes())
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 400]))
    with pytest.raises(MorphSeekError, match=r"short\.nii\.gz.*cut short"):
        io.read_image(tmp_path / "short.nii.gz")


def test_the_written_gzip_check_reads_the_trailer_and_catches_short_files(tmp_path):
    """Written .nii.gz files are checked by their gzip trailer (no full decompression); a file cut
    short or holding fewer bytes than its header promises fails that check (then the full check
    names the problem, as test_disk_full_while_writing_leaves_the_previous_result shows)."""
    whole = io.write_image(volume(), tmp_path / "whole.nii.gz")
    assert io._gzip_trailer_matches(whole)
    data = whole.read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: 2 * len(data) // 3])
    assert not io._gzip_trailer_matches(tmp_path / "cut.nii.gz")
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(gzip.decompress(data)[:-400]))
    assert not io._gzip_trailer_matches(tmp_path / "short.nii.gz")


# ------------------------------------------------------------------------ resume after SIGKILL
WARMUP_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from morphseek.data import load_dataset
from morphseek.nets.registry import build_model
from morphseek.train.warmup import WarmupConfig, warmup
data, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
torch.manual_seed(0)
config = WarmupConfig(grid=(32, 32, 32), iterations=6, checkpoint_every=1, validate_every=0, seed=4,
                      channels_last=False)
warmup(build_model({"backbone": "tiny"}), load_dataset(data), config, out, resume=resume)
"""


def _python(script: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(CORE), "OMP_NUM_THREADS": "1"}
    # a child inherits an ignored SIGINT (Python then keeps it ignored): start it as a shell would
    restore = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=restore, **kwargs)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint_files(path)[0]))


@pytest.mark.slow
def test_warmup_killed_with_sigkill_resumes_bit_identical(dataset, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    full = _python(WARMUP_SCRIPT, str(dataset), str(reference), "0")
    victim = _python(WARMUP_SCRIPT, str(dataset), str(killed), "0")
    log = killed.with_suffix(".log.jsonl")
    deadline = time.time() + 900  # generous: a loaded CI machine
    while victim.poll() is None and time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)  # at whatever moment it is: mid-iteration or mid-save
    victim.wait()
    assert full.wait(timeout=900) == 0, full.stderr.read().decode()
    iteration = load_checkpoint(killed)[2]["state"]["iteration"]
    assert 1 <= iteration < 6
    resumed = _python(WARMUP_SCRIPT, str(dataset), str(killed), "1")
    assert resumed.wait(timeout=900) == 0, resumed.stderr.read().decode()

    a, b = _weights(reference), _weights(killed)
    assert a.keys() == b.keys()
    for key in a:  # bit-identical: weights, Adam moments, random states
        assert torch.equal(a[key], b[key]), key
    rows_a = [json.loads(r) for r in reference.with_suffix(".log.jsonl").read_text().splitlines()]
    rows_b = [json.loads(r) for r in log.read_text().splitlines()]
    assert [r["iteration"] for r in rows_b] == list(range(1, 7))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


@pytest.mark.slow
def test_cancelled_grpo_resumes_bit_identical(dataset, tmp_path):
    from morphseek.data import load_dataset
    from morphseek.errors import Cancelled
    from morphseek.train.grpo import GRPOConfig, grpo_finetune

    data = load_dataset(dataset)
    train = [data.load_pair(p, tuple(GRID)) for p in data.train_pairs[:3]]
    torch.manual_seed(1)
    start = tmp_path / "start"
    save_checkpoint(start, build_model({"backbone": "tiny"}), {"grid": GRID, "similarity": "mse"})

    def run(out, cancel=None, resume=False):
        model, run_config, _ = load_checkpoint(start)
        config = GRPOConfig(steps=2, trajectories=2, episodes=3, seed=3)
        return grpo_finetune(model, train, (), config, out=out, resume=resume, cancel=cancel, run_config=run_config)

    run(tmp_path / "reference")
    polls = {"n": 0}

    def cancel_in_second_episode():
        polls["n"] += 1
        return polls["n"] == 4  # episode 2, step 2: that episode is not saved

    with pytest.raises(Cancelled):
        run(tmp_path / "resumed", cancel=cancel_in_second_episode)
    assert polls["n"] == 4 and load_checkpoint(tmp_path / "resumed")[2]["state"]["grpo"]["episode"] == 1
    assert run(tmp_path / "resumed", resume=True).done == 3
    a, b = _weights(tmp_path / "reference"), _weights(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_during_affine_prealignment_stops_at_once(workspace, tmp_path):
    """SimpleITK's registration ignores signals; the CLI runs it in a worker and stops on Ctrl-C."""
    root, paths = workspace
    big_fixed = write(volume(shape=(96, 96, 96), seed=8), root / "big_fixed.nii.gz")
    big_moving = write(volume(shape=(96, 96, 96), seed=9), root / "big_moving.nii.gz")
    argv = register_argv({**paths, "fixed": big_fixed, "moving": big_moving}, root / "out", prealign="affine")
    before = snapshot(root)
    for attempt in range(5):  # the run may end before Ctrl-C lands (a fast machine, or a loaded one): retry
        process = _python("import sys; from morphseek.cli import main; sys.exit(main(sys.argv[1:]))", *argv)
        deadline = time.time() + 120
        err = b""
        os.set_blocking(process.stderr.fileno(), False)
        while time.time() < deadline and b"affine" not in err and process.poll() is None:
            err += process.stderr.read() or b""
            time.sleep(0.01)
        assert b"affine" in err, err
        sent = time.time()
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        err += process.stderr.read() or b""
        if process.returncode != 0:
            break
        shutil.rmtree(root / "out", ignore_errors=True)  # it finished first: not what this test is about
        before = snapshot(root)
    else:
        raise AssertionError("the registration finished before Ctrl-C took effect, five times")
    assert process.returncode == 130, err
    assert time.time() - sent < 10  # (2 s when the machine is quiet)
    assert b"nothing was written" in err and b"checkpoint" not in err
    assert snapshot(root) == before


def test_checkpoint_loading_never_runs_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "PWNED"),))

    for name, payload in (("evil.pt", {"format_version": 1, "x": Payload()}),):
        path = tmp_path / name
        with open(path, "wb") as handle:
            torch.save(payload, handle)
        with pytest.raises(MorphSeekError) as info:
            load_checkpoint(path)
        assert "weights_only" not in str(info.value) and name in str(info.value)
    raw = tmp_path / "raw.pt"  # a plain pickle (not a torch zip)
    raw.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(MorphSeekError, match="raw.pt"):
        load_checkpoint(raw)
    assert not (tmp_path / "PWNED").exists()


def test_ct_is_padded_with_its_background_not_with_zero():
    """Outside a CT image is air (about -1000 HU), not 0 HU (soft tissue)."""
    ct = sitk.Cast(sitk.GetImageFromArray(np.full((12, 12, 12), -1000, np.int16)), sitk.sitkInt16)
    ct[6, 6, 6] = 40
    shift = sitk.TranslationTransform(3, (30.0, 0.0, 0.0))  # samples far outside the image
    padded = sitk.GetArrayFromImage(io.resample_to(ct, ct, shift))
    assert (padded == -1000).all()
    labels = sitk.Cast(ct > 0, sitk.sitkUInt8)
    assert (sitk.GetArrayFromImage(io.resample_to(labels, labels, shift, is_label=True)) == 0).all()


def test_warped_ct_is_padded_with_its_background_not_with_zero():
    """Where x + u(x) leaves the moving CT, the warped image (the registration's warped output and
    ``export.warp_original``) holds the CT's background, air (its minimum, -1024 HU), not 0 HU;
    labels are still padded with 0 (no structure)."""
    from morphseek import export

    array = np.full((10, 12, 14), -1024, np.int16)
    array[3:7, 4:8, 5:9] = 60
    ct = sitk.GetImageFromArray(array)
    ct.SetSpacing((1.5, 1.0, 2.0))
    labels = sitk.Cast(ct > 0, sitk.sitkUInt8)
    shift = np.zeros((10, 12, 14, 3))
    shift[..., 0] = 12.0  # mm along x: the right half of the fixed grid reads beyond the image
    field = sitk.GetImageFromArray(shift, isVector=True)
    field.CopyInformation(ct)
    outside = np.zeros(array.shape, bool)
    outside[..., 6:] = True  # x index >= 6: 6 * 1.5 + 12 = 21 mm, beyond the extent (13 * 1.5 + 0.75 = 20.25)
    warped = sitk.GetArrayFromImage(export.warp_original(ct, ct, field))
    assert (warped[outside] == -1024).all(), np.unique(warped[outside])
    assert (warped[~outside] == -1024).sum() > 0 and (warped == 60).sum() > 0  # inside: the image
    warped_labels = sitk.GetArrayFromImage(export.warp_original(labels, ct, field, is_label=True))
    assert (warped_labels[outside] == 0).all()
    exporter = export.FieldExporter(ct, ct)  # the path of register_images' warped output
    voxels = torch.zeros(1, 3, *array.shape)
    voxels[0, 2] = 12.0 / 1.5  # the same shift in model-grid voxels (channel 2 = x)
    by_exporter = exporter.warp(exporter.source(ct), exporter.field(voxels)).numpy()
    np.testing.assert_allclose(by_exporter, warped, atol=1e-3)
