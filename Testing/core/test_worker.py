"""The worker entry point (``python -m morphseek.worker JOB.json``): job files are checked with
errors naming the file; the protocol is one JSON object per line on standard output, nothing else
(stray output goes to standard error); every step's files are complete on disk when its line
arrives; failures end with one ``error`` line of the right kind and a non-zero exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from morphseek import defaults
from morphseek.worker import JobError, Protocol, read_job, registration_stage, write_job

ENGINE = Path(__file__).resolve().parents[2] / "MorphSeekCore"


def run_worker(job_path: Path, timeout: float = 300) -> tuple[list[dict], str, int]:
    """The worker as a child process, as the Slicer module starts it; (events, stderr, status)."""
    completed = subprocess.run([sys.executable, "-m", "morphseek.worker", str(job_path)], cwd=ENGINE,
                               capture_output=True, text=True, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line]
    events = [json.loads(line) for line in lines]  # every stdout line is a protocol object
    return events, completed.stderr, completed.returncode


def test_read_job_resolves_paths_and_names_the_problem(tmp_path):
    job = write_job({"kind": "register", "model": "m.pt", "output": "out",
                     "inputs": {"fixed": "f.nrrd", "moving": "/data/m.nrrd", "fixed_seg": None}}, tmp_path / "job.json")
    read = read_job(job)
    assert read["model"] == str(tmp_path / "m.pt") and read["output"] == str(tmp_path / "out")
    assert read["inputs"] == {"fixed": str(tmp_path / "f.nrrd"), "moving": "/data/m.nrrd"}
    assert read["settings"] == {}
    with pytest.raises(JobError, match=r"job file .*nowhere.json: not found"):
        read_job(tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(JobError, match=r"bad.json: not readable JSON"):
        read_job(tmp_path / "bad.json")
    for job, problem in (({"kind": "segment"}, "'kind' must be one of register, finetune, devices"),
                         ({"kind": "register", "model": "m.pt", "output": "o", "inputs": {"fixed": "f"}},
                          "'inputs' must name at least 'fixed' and 'moving'"),
                         ({"kind": "finetune", "model": "m.pt", "dataset": "d"}, "'checkpoint' must be a path"),
                         ({"kind": "devices", "settings": [1]}, "'settings' must be an object")):
        write_job(job, tmp_path / "job.json")
        with pytest.raises(JobError, match=problem):
            read_job(tmp_path / "job.json")


@pytest.mark.parametrize("stage, message, expected", [
    ("prepare", "checking inputs", "checking"),
    ("prepare", "loading the model on cpu", "loading"),
    ("prepare", "affine pre-alignment", "prealign"),
    ("prepare", "resampling onto the model grid (32, 32, 32)", "resampling"),
    ("step", "step 1/3: kept candidate 1 of 2", "step"),
    ("done", "registration finished", "done"),
])
def test_registration_stages(stage, message, expected):
    assert registration_stage(message, stage) == expected


def test_protocol_writes_one_json_object_per_line(tmp_path):
    with open(tmp_path / "out.txt", "w") as stream:
        protocol = Protocol(stream)
        protocol.emit("progress", fraction=np.float32(0.5), path=tmp_path, message="two\nlines")
        protocol.emit("done", result={"n": np.int64(3)})
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"event": "progress", "fraction": 0.5, "path": str(tmp_path), "message": "two\nlines"},
        {"event": "done", "result": {"n": 3}}]


def test_a_bad_job_file_is_one_error_line(tmp_path):
    (tmp_path / "job.json").write_text('{"kind": "register"}')
    events, _, status = run_worker(tmp_path / "job.json")
    assert status == 2 and len(events) == 1
    assert events[0]["event"] == "error" and events[0]["error"] == "job"
    assert str(tmp_path / "job.json") in events[0]["message"] and "'model' must be a path" in events[0]["message"]


def test_devices_job_lists_the_cpu(tmp_path):
    events, _, status = run_worker(write_job({"kind": "devices"}, tmp_path / "job.json"))
    assert status == 0 and [e["event"] for e in events] == ["started", "done"]
    result = events[-1]["result"]
    assert result["devices"][0] == {"key": "cpu", "label": "CPU"} and result["torch"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    import torch

    from morphseek.checkpoint import save_checkpoint
    from morphseek.nets.registry import build_model
    from morphseek.synth import make_subject

    folder = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    model = build_model({"backbone": "tiny"})
    with torch.no_grad():
        model.backbone.flow.weight.normal_(0.0, 1.0)  # untrained but visibly deforming steps
    save_checkpoint(folder / "tiny.pt", model, {"grid": [32, 32, 32], "similarity": "mse"})
    for name, seed in (("fixed", 1), ("moving", 2)):
        subject = make_subject((32, 32, 32), seed=seed, n_labels=3)
        for suffix, array in (("", subject.image), ("_seg", subject.labels)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.2, 1.0, 1.4))
            sitk.WriteImage(image, str(folder / f"{name}{suffix}.nrrd"))
    return folder


def test_registration_job_announces_each_step_with_complete_files(pair, tmp_path):
    job = write_job({"kind": "register", "model": str(pair / "tiny.pt"), "output": str(tmp_path / "out"),
                     "inputs": {k: str(pair / f"{k}.nrrd") for k in ("fixed", "moving", "fixed_seg", "moving_seg")},
                     "names": {"fixed": "fixed volume 'A'"},
                     "settings": {"steps": 2, "trajectories": 2, "device": "cpu", "prealign": "none"}},
                    tmp_path / "job.json")
    command = [sys.executable, "-m", "morphseek.worker", str(job)]
    process = subprocess.Popen(command, cwd=ENGINE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = []
    for line in process.stdout:  # read as the panel does, while the worker runs
        event = json.loads(line)
        events.append(event)
        if event["event"] == "step":
            # The step's files are complete when its line arrives.
            assert set(event["files"]) == {"warped", "warped_seg", "jacobian", "displacement"}
            for kind, path in event["files"].items():
                image = sitk.ReadImage(path)
                assert image.GetSize() == (32, 32, 32)
                assert image.GetNumberOfComponentsPerPixel() == (3 if kind == "displacement" else 1)
            record = event["record"]
            assert record["step"] == event["step"] and len(record["candidates"]) == 2
            assert {"reward", "dice_gain", "similarity_gain", "njd_percent"} <= set(record["candidates"][0])
    process.wait(60)
    assert process.returncode == 0, process.stderr.read()
    names = [e["event"] for e in events]
    assert names[0] == "started" and names[-1] == "done" and names.count("step") == 2
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    assert stages[:4] == ["checking", "loading", "resampling", "step"] and "prealign" not in stages
    assert stages.count("export") == 2
    result = events[-1]["result"]
    assert result["report"]["settings"]["trajectories"] == 2 and len(result["report"]["steps"]) == 2
    assert result["files"]["warped"].endswith("step_02/warped.nrrd")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == result["report"]


def test_registration_job_with_test_time_optimisation_reports_it_as_one_more_step(pair, tmp_path):
    """``settings.adapt`` = N: the network's steps, then one step of kind ``adapt`` (announced and
    reported like the others, with its files), counted in ``total_steps`` everywhere."""
    job = write_job({"kind": "register", "model": str(pair / "tiny.pt"), "output": str(tmp_path / "out"),
                     "inputs": {k: str(pair / f"{k}.nrrd") for k in ("fixed", "moving", "fixed_seg", "moving_seg")},
                     "settings": {"steps": 2, "trajectories": 1, "adapt": 5, "adapt_lambda": 2.5, "device": "cpu",
                                  "prealign": "none"}},
                    tmp_path / "job.json")
    events, stderr, status = run_worker(job)
    assert status == 0, stderr[-3000:]
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3] and {e["total_steps"] for e in steps} == {3}
    assert [e["kind"] for e in steps] == [e["record"]["kind"] for e in steps] == ["network", "network", "adapt"]
    last = steps[-1]
    assert "test-time optimisation" in last["message"] and len(last["record"]["candidates"]) == 1
    assert set(last["files"]) == {"warped", "warped_seg", "jacobian", "displacement"}
    assert sitk.ReadImage(last["files"]["displacement"]).GetNumberOfComponentsPerPixel() == 3
    running = [e["message"] for e in events if e["event"] == "progress" and e["stage"] == "step"]
    assert running == ["step 1/3: refining", "step 2/3: refining", "step 3/3: test-time optimisation (5 iterations)"]
    report = events[-1]["result"]["report"]
    assert report["settings"]["adapt"] == 5 and report["final"]["kind"] == "adapt" and len(report["steps"]) == 3
    assert report["settings"]["adapt_settings"]["lambda_reg"] == 2.5  # the job's smoothness reached adapt
    assert events[-1]["result"]["files"]["warped"].endswith("step_03/warped.nrrd")


def test_a_jobs_fine_steps_reach_the_engine(pair, tmp_path):
    """``settings.fine_steps``: absent or null lets the engine choose (0 for this fixed-grid model), a
    number is passed on; fine steps with a model that has no spacing are an input error saying so."""
    def job(fine, name):
        settings = {"steps": 1, "device": "cpu", "prealign": "none", **({"fine_steps": fine} if fine != "absent" else {})}
        return write_job({"kind": "register", "model": str(pair / "tiny.pt"), "output": str(tmp_path / name),
                          "inputs": {k: str(pair / f"{k}.nrrd") for k in ("fixed", "moving")},
                          "settings": settings}, tmp_path / f"{name}.json")

    for fine in ("absent", None, 0):
        events, stderr, status = run_worker(job(fine, f"out{fine}"))
        assert status == 0, stderr[-3000:]
        assert events[-1]["result"]["report"]["settings"]["fine_steps"] == 0
    events, _, status = run_worker(job(1, "fine"))
    assert status == 1 and events[-1]["error"] == "input" and "physical spacing" in events[-1]["message"]


def test_a_jobs_crop_setting_reaches_the_engine(pair, tmp_path):
    """``settings.crop``: absent lets each step's network see the content box (``defaults.CROP_MARGIN``),
    false the whole grid; the report says which ran."""
    for crop in ("absent", False):
        settings = {"steps": 1, "device": "cpu", "prealign": "none", **({"crop": crop} if crop != "absent" else {})}
        events, stderr, status = run_worker(write_job(
            {"kind": "register", "model": str(pair / "tiny.pt"), "output": str(tmp_path / f"out{crop}"),
             "inputs": {k: str(pair / f"{k}.nrrd") for k in ("fixed", "moving")}, "settings": settings},
            tmp_path / f"{crop}.json"))
        assert status == 0, stderr[-3000:]
        expected = defaults.CROP_MARGIN if crop == "absent" else None
        assert events[-1]["result"]["report"]["settings"]["crop_margin"] == expected


def test_a_missing_model_is_an_input_error_naming_the_file(pair, tmp_path):
    job = write_job({"kind": "register", "model": str(tmp_path / "absent.pt"), "output": str(tmp_path / "out"),
                     "inputs": {k: str(pair / f"{k}.nrrd") for k in ("fixed", "moving")},
                     "settings": {"device": "cpu"}}, tmp_path / "job.json")
    events, _, status = run_worker(job)
    assert status == 1 and events[-1]["event"] == "error" and events[-1]["error"] == "input"
    assert str(tmp_path / "absent.pt") in events[-1]["message"]


def test_out_of_memory_errors_are_recognised():
    import torch

    from morphseek.worker import is_out_of_memory

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1024 bytes. Error code 12 (out of memory)"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # only errors that can mean memory


BRAIN_MODEL = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "morphseek-brain"
BRAIN_SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "SampleData" / "brain" / "manifest.json"


def test_fine_tuning_a_model_whose_grid_follows_the_voxel_size(tmp_path):
    """The panel's fine-tuning job prepares cases as registration does for this model: the brain
    model's grid is by voxel size (4 mm), not a fixed shape, so the pairs reach GRPO on that grid."""
    import morphseek.train.grpo as grpo
    from morphseek.errors import MorphSeekError
    from morphseek.worker import finetune

    seen = []
    original = grpo.grpo_finetune

    def spy(model, train, val, config, **kwargs):
        seen.extend((tuple(s.fixed.shape[2:]), s.grid.spacing) for s in list(train) + list(val))
        return original(model, train[:1], val[:1], config, **kwargs)

    grpo.grpo_finetune = spy
    try:
        result = finetune(BRAIN_SAMPLE, BRAIN_MODEL, tmp_path / "tuned", episodes=1, steps=1, trajectories=2,
                          device="cpu")
    finally:
        grpo.grpo_finetune = original
    assert result.done == 1 and (tmp_path / "tuned.safetensors").is_file()
    # the sample's 2 mm brains (88x120x102 voxels) on the 4 mm grid in LIA axes, padded to (64, 64, 48)
    # (a grid by shape alone would have stretched them to anisotropic voxels of another size)
    assert seen and set(seen) == {((64, 64, 48), (4.0, 4.0, 4.0))}, seen
    with pytest.raises(MorphSeekError, match="GRPO only"):
        finetune(BRAIN_SAMPLE, BRAIN_MODEL, tmp_path / "other", warmup_iterations=5, episodes=1, device="cpu")


def test_fine_tuning_never_writes_over_its_starting_model(pair, tmp_path):
    import shutil

    from morphseek.checkpoint import checkpoint_files
    from morphseek.errors import MorphSeekError
    from morphseek.worker import finetune

    start = tmp_path / "start.pt"
    for source, target in zip(checkpoint_files(pair / "tiny.pt"), checkpoint_files(start)):
        shutil.copy(source, target)
    before = checkpoint_files(start)[0].read_bytes()
    for out in (start, tmp_path / "start.safetensors"):
        with pytest.raises(MorphSeekError, match="would overwrite the input"):
            finetune(tmp_path / "no-cases", start, out, episodes=1, device="cpu")
    assert checkpoint_files(start)[0].read_bytes() == before


def test_with_a_warm_up_the_run_is_judged_against_the_model_as_it_came(pair, tmp_path):
    # held-back Dice "before" is the starting model's, not the warmed-up one GRPO starts from
    import torch

    from morphseek.checkpoint import load_checkpoint
    from morphseek.data import load_dataset, load_samples
    from morphseek.evaluate import evaluate_pairs
    from morphseek.synth import write_dataset
    from morphseek.worker import finetune

    cases = tmp_path / "cases"
    write_dataset(cases, n_subjects=6, shape=(32, 32, 32), seed=0, n_labels=4)
    net, run_config, _ = load_checkpoint(pair / "tiny.pt")
    data = load_dataset(cases)
    val = load_samples(data, data.val_pairs, run_config, torch.device("cpu"), net.divisor, (32, 32, 32))
    assert val  # 6 subjects hold 2 back
    expected = evaluate_pairs(net, val, steps=1)
    result = finetune(cases, pair / "tiny.pt", tmp_path / "tuned", warmup_iterations=3, episodes=1, steps=1,
                      trajectories=2, device="cpu")
    assert result.validation_start == pytest.approx(expected)
    assert result.held_back_fell == (result.validation["val_dice"] < expected["val_dice"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pre-alignment forks only on Linux")
def test_registration_job_pre_aligns_in_a_child_started_before_torch(pair, tmp_path):
    """The worker reads the pair and starts the affine pre-alignment in a child process before it
    imports torch (``RegisterInputs``), so that the two overlap; the registration then waits for the
    child's transform at its pre-alignment stage, which is the transform computed in-process."""
    job = write_job({"kind": "register", "model": str(pair / "tiny.pt"), "output": str(tmp_path / "out"),
                     "inputs": {k: str(pair / f"{k}.nrrd") for k in ("fixed", "moving")},
                     "settings": {"steps": 1, "device": "cpu", "prealign": "affine"}}, tmp_path / "job.json")
    code = ("import json, sys; from morphseek import prealign, worker\n"
            "start, result = prealign.PrealignInChild.start, prealign.PrealignInChild.result\n"
            "def traced_start(*a, **k):\n"
            "    print('CHILD STARTED, torch imported:', 'torch' in sys.modules, file=sys.stderr, flush=True)\n"
            "    return start(*a, **k)\n"
            "def traced(self, *a, **k):\n"
            "    found = result(self, *a, **k)\n"
            "    print('CHILD', json.dumps(found.GetParameters()), file=sys.stderr, flush=True)\n"
            "    return found\n"
            "prealign.PrealignInChild.start, prealign.PrealignInChild.result = traced_start, traced\n"
            "sys.exit(worker.main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, str(job)], cwd=ENGINE, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line]
    assert events[0]["event"] == "started" and events[-1]["event"] == "done"
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    assert stages.index("prealign") < stages.index("resampling")
    assert "CHILD STARTED, torch imported: False" in done.stderr
    line = [l for l in done.stderr.splitlines() if l.startswith("CHILD [")]
    assert len(line) == 1, done.stderr[-2000:]
    from morphseek import io, prealign
    expected = prealign.affine_prealign(io.read_image(pair / "fixed.nrrd"), io.read_image(pair / "moving.nrrd"))
    assert json.loads(line[0][len("CHILD"):]) == list(expected.GetParameters())


def test_a_bad_input_is_reported_after_the_started_line(pair, tmp_path):
    """The pair is read before torch's import, but an unreadable input is reported after ``started``,
    which stays the protocol's first line."""
    job = write_job({"kind": "register", "model": str(pair / "tiny.pt"), "output": str(tmp_path / "out"),
                     "inputs": {"fixed": str(pair / "fixed.nrrd"), "moving": str(tmp_path / "missing.nrrd")},
                     "settings": {"steps": 1, "device": "cpu", "prealign": "affine"}}, tmp_path / "job.json")
    events, stderr, status = run_worker(job)
    assert [e["event"] for e in events] == ["started", "error"] and status == 1, stderr
    assert events[1]["error"] == "input" and "missing.nrrd" in events[1]["message"]


def test_entry_points_let_idle_openmp_threads_sleep_unless_told_otherwise(monkeypatch, capsys):
    """``morphseek`` and the worker set ``defaults.OPENMP_ENVIRONMENT`` before torch loads OpenMP
    (spinning threads slow a registration 1.6-6x when another process is busy on a core), and keep
    what the user set."""
    import os

    from morphseek import cli, defaults, worker

    assert defaults.OPENMP_ENVIRONMENT == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert worker.main(["--help"]) == 2 and os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker.main(["--help"]) == 2 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_entry_points_keep_freed_memory_for_the_next_tensor(monkeypatch):
    """``morphseek`` and the worker call ``process.keep_freed_memory``; in a process where it
    applied, a large tensor freed and made again is not page-faulted afresh (where glibc's default
    maps and zeroes it again), and a user's own MALLOC_ variables are left to choose."""
    import os
    import resource

    from morphseek import cli, process, worker

    calls = []
    monkeypatch.setattr(process, "keep_freed_memory", lambda: calls.append(1) or True)
    assert worker.main(["--help"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert len(calls) == 2
    probe = (
        "import resource, sys, torch\n"
        "from morphseek import process\n"
        "applied = process.keep_freed_memory() if sys.argv[1] == 'keep' else False\n"
        "torch.ones(16 << 20)\n"  # 64 MiB made and freed once
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(10):\n"
        "    torch.ones(16 << 20) + 1\n"  # as a step makes and frees its large tensors
        "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(Path(process.__file__).resolve().parents[1])
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, check=True,
                             env=env).stdout.split()
        faults[mode] = (out[0] == "True", int(out[1]))
    pages = 20 * (64 << 20) // resource.getpagesize()  # 20 tensors of 64 MiB
    assert faults["default"][1] > pages // 2, faults  # glibc's default: every page faulted again
    if sys.platform.startswith("linux") and faults["keep"][0]:
        assert faults["keep"][1] < faults["default"][1] // 2, faults
    monkeypatch.undo()  # the real keep_freed_memory again
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert process.keep_freed_memory() is False
