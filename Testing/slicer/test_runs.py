"""The panel's runs through the real worker process (``python -m morphseek.worker``) on CPU: a
registration whose steps fill the preview as they arrive, a fine-tuning with its live chart, Cancel
at each stage (model loading, pre-alignment, a step, export) stopping the process tree within 1 s
with the scene as before, and a worker that is killed with SIGKILL, that raises, or that is given a
broken checkpoint, that crashes (SIGSEGV), runs out of memory or leaves an unreadable step file,
each reported clearly with the scene as before and the next run working."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from MorphSeekLib import preview, selftest
from MorphSeekLib.logic import SceneLogic
from MorphSeekLib.offscreen import OffscreenSliceView, new_scene, side_by_side, write_png
from MorphSeekLib.runs import FinetuneRun, RegistrationRun, RunState, WorkerLaunch

HERE = Path(__file__).resolve().parent
CANCEL_SECONDS = 1.0
STAGE_TIMEOUT = 900.0  # starting a worker imports torch: minutes on a machine loaded by other jobs
EXIT_SECONDS = 10.0  # after SIGKILL, until the system has torn the process down (loaded machine)
SCREENSHOTS = REPO / "Resources" / "Screenshots"
UPDATE_SCREENSHOTS = os.environ.get("MORPHSEEK_UPDATE_SCREENSHOTS") == "1"


def held(stage: str) -> WorkerLaunch:
    """The real worker with ``stage`` hanging (or failing, for ``raise``): hold_worker.py."""
    return WorkerLaunch(command=[sys.executable, str(HERE / "hold_worker.py"), stage])


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def poll_until(run, done, timeout: float = STAGE_TIMEOUT) -> list:
    """Poll as the panel's timer does until ``done(updates so far)``; returns the updates."""
    updates, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        updates += run.poll()
        if done(updates):
            return updates
        time.sleep(0.05)
    run.cancel()
    raise AssertionError(f"timed out; updates: {[(u.kind, u.message) for u in updates][-10:]}")


def ended(updates) -> bool:
    return any(u.kind in ("finished", "failed", "cancelled") for u in updates)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The self-test's synthetic oblique pair with segmentations in a scene of its own, and a tiny
    checkpoint."""
    scene = new_scene()
    nodes = selftest.synthetic_case(scene)
    model = selftest.tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")
    yield scene, nodes, model
    scene.Clear(True)


def request_for(scene, nodes, model, **settings):
    options = dict(steps=3, trajectories=2, device="cpu", prealign="affine")
    options.update(settings)
    return SceneLogic(scene).prepare(nodes["fixed"], nodes["moving"], nodes["fixed_seg"], nodes["moving_seg"],
                                     model=model, **options)


def test_registration_in_the_worker_fills_the_preview_step_by_step(pair, tmp_path):
    scene, nodes, model = pair
    logic = SceneLogic(scene)
    run = RegistrationRun(logic, request_for(scene, nodes, model), WorkerLaunch(temporary_folder=tmp_path)).start()
    folder = run.folder
    assert (folder / "inputs" / "fixed.nrrd").is_file() and (folder / "job.json").is_file()
    view = OffscreenSliceView(scene, "Red", (240, 240))
    frames, steps_in_preview, updates, snapshot = [], [], [], None
    started = time.perf_counter()
    try:
        while run.running:
            if time.perf_counter() - started > STAGE_TIMEOUT:
                run.cancel()
                raise AssertionError(f"the registration did not finish within {STAGE_TIMEOUT:.0f} s")
            for update in run.poll():
                updates.append(update)
                if update.kind == "step":
                    # The step is in the scene as soon as it is reported: the preview grows live.
                    # (One poll applies every event the worker has written; on a loaded machine
                    # two steps can arrive in one poll, so the preview may already hold the next.)
                    steps_in_preview.append((update.payload.index, run.preview.number_of_steps))
                    assert set(run.preview.proxies) == {"warped", "segmentation", "jacobian", "folding"}
                    if snapshot is None:  # as the panel does when the first step arrives
                        snapshot = preview.snapshot_views(scene, [view.logic])
                        preview.show_only_segmentation(scene, run.preview.proxies["segmentation"])
                    overlay, _ = preview.preview_layers(nodes["fixed"].GetID(), run.preview)
                    view.show(overlay, "Axial")
                    frames.append(view.capture())
            time.sleep(0.05)
        # What a cancelled run does with the views: they show what they showed before.
        snapshot.restore()
        assert view.logic.GetSliceCompositeNode().GetForegroundVolumeID() is None
        assert nodes["fixed_seg"].GetDisplayNode().GetVisibility2D()
    finally:
        view.close()
    seconds = time.perf_counter() - started
    kinds = [u.kind for u in updates]
    assert run.state is RunState.FINISHED, [(u.kind, u.message) for u in updates if u.kind == "failed"]
    print(f"registration in the worker: {seconds:.1f} s (3 steps x 2 candidates, 32^3, CPU)")
    assert [index for index, _ in steps_in_preview] == [1, 2, 3]
    assert all(index <= shown <= 3 for index, shown in steps_in_preview), steps_in_preview
    assert kinds[-1] == "finished" and kinds.count("step") == 3
    stages = [u.stage for u in updates if u.kind == "progress"]
    for stage in ("checking", "loading", "prealign", "resampling", "step", "export"):
        assert stage in stages, f"no {stage} progress ({stages})"
    steps = [u.payload for u in updates if u.kind == "step"]
    assert [len(s.candidates) for s in steps] == [2, 2, 2] and all(0 <= s.kept < 2 for s in steps)
    outputs = run.outputs
    assert outputs.preview is run.preview and outputs.preview.number_of_steps == 3
    assert selftest.check_registration(scene, nodes, outputs) == []  # Slicer's resampling = the engine's warp
    assert outputs.candidates_table.GetNumberOfRows() == 6 and outputs.metrics_table.GetNumberOfRows() == 4
    assert not folder.exists(), "the run's temporary folder was left behind"
    for frame in frames:
        assert frame.std() > 10, "blank live preview render"
    assert not np.array_equal(frames[0], frames[-1]), "the live preview did not change between steps"
    sheet = side_by_side(*frames)
    target = SCREENSHOTS / "live-preview.png" if UPDATE_SCREENSHOTS else tmp_path / "live-preview.png"
    write_png(sheet, target)
    print(f"live preview frames (after steps 1, 2, 3): {target}")
    for node in outputs.nodes():
        scene.RemoveNode(node)


def test_test_time_optimisation_arrives_as_one_more_step_of_the_live_preview(pair, tmp_path):
    """adapt > 0 (the panel's "Test-time optimisation iterations"): the request's setting reaches the
    worker's job, the network's steps arrive, then one more step of kind "adapt", which joins the
    preview and the tables labelled as test-time optimisation, not as a network step."""
    scene, nodes, model = pair
    request = request_for(scene, nodes, model, steps=2, trajectories=1, prealign="none", adapt=4, adapt_lambda=2.0)
    assert request.adapt == 4 and request.adapt_lambda == 2.0 and request.total_steps == 3
    run = RegistrationRun(SceneLogic(scene), request, WorkerLaunch(temporary_folder=tmp_path)).start()
    job = json.loads((run.folder / "job.json").read_text())
    assert job["settings"]["adapt"] == 4 and job["settings"]["adapt_lambda"] == 2.0
    assert job["settings"]["fine_steps"] is None  # the engine chooses for the model (``resolve_fine_steps``)
    assert job["settings"]["crop"] is True  # each step's network on the content box, as the worker reads it
    live = []  # (step, kind, steps in the preview) as each step arrives

    def record(updates):
        live.extend((u.payload.index, u.payload.kind, run.preview.number_of_steps) for u in updates[len(seen):]
                    if u.kind == "step")
        seen[:] = updates
        return ended(updates)

    seen = []
    updates = poll_until(run, record)
    assert updates[-1].kind == "finished", [(u.kind, u.message) for u in updates if u.kind == "failed"]
    # Each step is in the preview when its update is handled (several may land in one poll).
    assert [(index, kind) for index, kind, _ in live] == [(1, "network"), (2, "network"), (3, "adapt")]
    assert all(in_preview >= index for index, _, in_preview in live)
    running = [u.message for u in updates if u.kind == "progress" and u.stage == "step"]
    assert running[-1] == "step 3/3: test-time optimisation (4 iterations)", running
    last = [u for u in updates if u.kind == "step"][-1]
    assert "test-time optimisation" in last.message
    assert preview.step_title(last.payload, request.total_steps) == "step 3 of 3: test-time optimisation"
    outputs = run.outputs
    assert outputs.preview.number_of_steps == 3
    metrics = outputs.metrics_table
    assert [metrics.GetCellText(r, 5) for r in range(4)] == ["initial", "network", "network", "test-time optimisation"]
    assert outputs.candidates_table.GetCellText(2, 7) == "test-time optimisation"
    assert selftest.check_registration(scene, nodes, outputs) == []  # the result is the adapted map
    for node in outputs.nodes():
        scene.RemoveNode(node)


def running_members(group: int) -> list[int]:
    """The processes of process group ``group`` that have not ended (zombies have: they only wait
    for their parent to collect their status)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no /proc: any member, zombie or not
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return []
        return [group]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry.name))
    return members


@pytest.mark.parametrize("stage", ["loading", "prealign", "step", "export"])
def test_cancel_at_each_stage_stops_within_a_second_and_leaves_the_scene(pair, stage, tmp_path):
    scene, nodes, model = pair
    before = node_ids(scene)
    launch = held(stage)
    launch.temporary_folder = tmp_path
    run = RegistrationRun(SceneLogic(scene), request_for(scene, nodes, model), launch).start()
    updates = poll_until(run, lambda u: any(x.kind == "log" and x.message == f"HOLD {stage}" for x in u) or ended(u))
    assert not ended(updates), [(u.kind, u.message) for u in updates if u.kind != "log"]
    if stage == "export":  # step 1 arrived and is in the preview: cancel must remove it too
        assert [u.kind for u in updates].count("step") == 1 and node_ids(scene) != before
    worker = run.worker
    started = time.perf_counter()
    update = run.cancel()
    seconds = time.perf_counter() - started
    print(f"cancel during {stage}: {1000 * seconds:.0f} ms")
    assert seconds < CANCEL_SECONDS  # the panel has its scene back at once
    assert update.kind == "cancelled" and run.state is RunState.CANCELLED
    worker.process.wait(EXIT_SECONDS)
    assert worker.returncode == -signal.SIGKILL
    # The whole process group has ended: the worker and its pre-alignment child (killed with the
    # group; init, not the test, reaps that child, so it may stay a zombie for a while).
    deadline = time.monotonic() + EXIT_SECONDS
    while running_members(worker.process.pid):
        assert time.monotonic() < deadline, f"processes of the worker's group still run: {running_members(worker.process.pid)}"
        time.sleep(0.05)
    assert node_ids(scene) == before
    assert not run.folder.exists()
    assert run.poll() == []


def test_worker_killed_with_sigkill_is_reported(pair, tmp_path):
    """What the out-of-memory killer does: SIGKILL from outside, mid-step."""
    scene, nodes, model = pair
    before = node_ids(scene)
    launch = held("export")
    launch.temporary_folder = tmp_path
    run = RegistrationRun(SceneLogic(scene), request_for(scene, nodes, model), launch).start()
    poll_until(run, lambda u: any(x.message == "HOLD export" for x in u) or ended(u))
    os.kill(run.worker.process.pid, signal.SIGKILL)
    updates = poll_until(run, ended, timeout=60)
    failed = updates[-1]
    assert failed.kind == "failed" and run.state is RunState.FAILED
    print("SIGKILL reported as:", failed.message)
    assert "MorphSeek worker was killed (SIGKILL)" in failed.message and "memory" in failed.message
    assert "HOLD export" in failed.details  # the worker's last lines of standard error
    assert node_ids(scene) == before and not run.folder.exists()


def test_worker_that_raises_is_reported_and_the_next_run_works(pair, tmp_path):
    scene, nodes, model = pair
    before = node_ids(scene)
    launch = held("raise")
    launch.temporary_folder = tmp_path
    run = RegistrationRun(SceneLogic(scene), request_for(scene, nodes, model), launch).start()
    updates = poll_until(run, ended)
    failed = updates[-1]
    print("exception reported as:", failed.message)
    assert failed.kind == "failed"
    assert failed.message == "ValueError: injected failure inside a refinement step"
    assert "Traceback" in failed.details and "hold_worker.py" in failed.details
    assert node_ids(scene) == before and not run.folder.exists()
    # The panel keeps working: the next run (one step, no search) goes through.
    again = RegistrationRun(SceneLogic(scene), request_for(scene, nodes, model, steps=1, trajectories=1),
                            WorkerLaunch(temporary_folder=tmp_path)).start()
    assert poll_until(again, ended)[-1].kind == "finished"
    for node in again.outputs.nodes():
        scene.RemoveNode(node)


@pytest.mark.parametrize("failure, expected", [
    ("crash", "the MorphSeek worker crashed (SIGSEGV, an error in native code"),
    ("oom", "out of memory during a registration (MemoryError): use fewer candidates (J)"),
    ("corrupt", "step 1: the worker's warped file "),
])
def test_crash_out_of_memory_and_unreadable_results_are_reported(pair, tmp_path, failure, expected):
    """A worker dying in native code, running out of memory, or leaving a file the panel cannot
    read: one clear message, the worker stopped, the scene as before."""
    scene, nodes, model = pair
    before = node_ids(scene)
    launch = held(failure)
    launch.temporary_folder = tmp_path
    run = RegistrationRun(SceneLogic(scene), request_for(scene, nodes, model, steps=2, trajectories=1), launch).start()
    updates = poll_until(run, ended)
    failed = updates[-1]
    print(f"{failure} reported as: {failed.message}")
    assert failed.kind == "failed" and expected in failed.message
    if failure == "corrupt":
        assert "cannot be read" in failed.message and "warped.nrrd" in failed.message
    assert not run.worker.is_running()
    assert node_ids(scene) == before and not run.folder.exists()


def test_a_broken_checkpoint_is_reported_naming_the_file(pair, tmp_path):
    scene, nodes, _ = pair
    before = node_ids(scene)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    run = RegistrationRun(SceneLogic(scene), request_for(scene, nodes, broken),
                          WorkerLaunch(temporary_folder=tmp_path)).start()
    failed = poll_until(run, ended)[-1]
    print("broken checkpoint reported as:", failed.message)
    assert failed.kind == "failed" and str(broken) in failed.message
    assert node_ids(scene) == before


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from morphseek.synth import write_dataset

    folder = tmp_path_factory.mktemp("cases")
    write_dataset(folder, n_subjects=3, shape=(32, 32, 32), seed=0, n_labels=4)
    return folder


def test_finetune_in_the_worker_writes_a_checkpoint_and_a_live_chart(pair, dataset, tmp_path):
    scene, _, model = pair
    out = tmp_path / "tuned.safetensors"
    run = FinetuneRun(scene, dataset, model, out, warmup_iterations=1, episodes=2, steps=1, trajectories=2,
                      device="cpu", launch=WorkerLaunch(temporary_folder=tmp_path)).start()
    updates = poll_until(run, ended)
    assert updates[-1].kind == "finished", [(u.kind, u.message) for u in updates if u.kind == "failed"]
    rows = [u.payload for u in updates if u.kind == "progress" and u.stage in ("warmup", "grpo")]
    assert [r["stage"] for r in rows].count("grpo") == 2 and "warmup" in [r["stage"] for r in rows]
    assert rows[-1]["done"] == rows[-1]["total"] == 2
    assert run.chart is not None and run.chart.GetNthPlotSeriesNode(0).GetTableNode().GetNumberOfRows() >= 1
    result = updates[-1].payload
    assert Path(result["checkpoint"]) == out.resolve() and out.is_file() and result["episodes_done"] == 2
    # 3 cases hold none back: no held-back evaluation before GRPO or after it, so nothing fell
    # (test_finetune_scene.py has held-back cases; the panel's use of these: module_widget_checks.py)
    assert result["validation_start"] == result["validation"] == {} and result["held_back_fell"] is False
    from morphseek.checkpoint import load_checkpoint

    load_checkpoint(out)  # the checkpoint loads as a model
    for node_id in run.tracker.node_ids:
        if scene.GetNodeByID(node_id) is not None:
            scene.RemoveNode(scene.GetNodeByID(node_id))


def test_cancel_during_finetuning_removes_its_chart(pair, dataset, tmp_path):
    scene, _, model = pair
    before = node_ids(scene)
    run = FinetuneRun(scene, dataset, model, tmp_path / "never.pt", warmup_iterations=0, episodes=200, steps=1,
                      trajectories=2, device="cpu", launch=WorkerLaunch(temporary_folder=tmp_path)).start()
    poll_until(run, lambda u: any(x.kind == "progress" and x.stage == "grpo" for x in u) or ended(u))
    assert run.running and run.chart is not None and node_ids(scene) != before
    started = time.perf_counter()
    run.cancel()
    assert time.perf_counter() - started < CANCEL_SECONDS
    assert node_ids(scene) == before and run.state is RunState.CANCELLED
