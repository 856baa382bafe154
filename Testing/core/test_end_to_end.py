"""End to end on synthetic data: a briefly warmed-up model measurably raises Dice over identity on
held-back pairs; checkpoints resume; the command line runs register and evaluate on files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from morphseek import cli, defaults, geometry, metrics
from morphseek.checkpoint import load_checkpoint, save_checkpoint
from morphseek.data import load_dataset
from morphseek.errors import Cancelled
from morphseek.nets.registry import build_model
from morphseek.synth import write_dataset
from morphseek.train.warmup import WarmupConfig, warmup

GRID = (32, 32, 32)


@pytest.fixture(scope="module")
def dataset_path(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synth"), n_subjects=8, shape=GRID, seed=7)


@pytest.fixture(scope="module")
def trained(dataset_path, tmp_path_factory):
    torch.manual_seed(0)
    dataset = load_dataset(dataset_path)
    model = build_model({"backbone": "voxelmorph"})
    out = tmp_path_factory.mktemp("ckpt") / "warm.pt"
    # every step of a 2-step refinement trained (refine_steps): measured 62.6 -> 66.5 -> 69.0 % held-back Dice
    config = WarmupConfig(grid=GRID, iterations=300, learning_rate=2e-3, checkpoint_every=100, validate_every=0, seed=0,
                          refine_steps=2)
    warmup(model, dataset, config, out)
    return dataset, out


def _held_back_dice(model, dataset, steps):
    """Mean Dice (%) of identity and after 1..steps deterministic steps over the val pairs."""
    from morphseek.register import refine

    rows = []
    for pair in dataset.val_pairs:
        s = dataset.load_pair(pair, GRID)
        record = [100 * float(metrics.dice_torch(s.fixed_labels, s.moving_labels, s.label_values)[0])]
        for step in refine(model, s.moving, s.fixed, steps=steps):
            warped = geometry.warp_labels(s.moving_labels, step.total)
            record.append(100 * float(metrics.dice_torch(s.fixed_labels, warped, s.label_values)[0]))
        rows.append(record)
    return np.mean(rows, axis=0)


@pytest.mark.slow
def test_warmup_raises_held_back_dice_over_identity(trained):
    dataset, ckpt = trained
    model, config, extra = load_checkpoint(ckpt)
    model.eval()
    dice = _held_back_dice(model, dataset, steps=2)
    assert config.grid == tuple(GRID) and extra["state"]["iteration"] == 300
    # identity -> one step: a clear gain on pairs never seen in training; the second step adds more
    assert dice[1] > dice[0] + 2.0 and dice[2] > dice[1], dice
    # the log was written row by row
    rows = [json.loads(line) for line in ckpt.with_suffix(".log.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and {"loss", "sim", "reg", "kl"} <= set(rows[0])


def test_cancelled_warmup_keeps_a_checkpoint_and_resumes(dataset_path, tmp_path):
    dataset = load_dataset(dataset_path)
    out = tmp_path / "w.pt"
    config = WarmupConfig(grid=GRID, iterations=6, checkpoint_every=100, validate_every=0)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        warmup(build_model({"backbone": "tiny"}), dataset, config, out, cancel=cancel)
    _, _, extra = load_checkpoint(out)
    assert extra["state"]["iteration"] == 3 and extra["optimizer"] is not None
    warmup(build_model({"backbone": "tiny"}), dataset, config, out, resume=True)
    _, _, extra = load_checkpoint(out)
    assert extra["state"]["iteration"] == 6
    rows = [json.loads(line) for line in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_cli_register_and_evaluate_on_files(trained, dataset_path, tmp_path, capsys):
    dataset, ckpt = trained
    moving_id, fixed_id = dataset.val_pairs[0]
    f, m = dataset.subject(fixed_id), dataset.subject(moving_id)
    out = tmp_path / "reg"
    code = cli.main(["register", "--fixed", str(f.image), "--moving", str(m.image), "--fixed-seg", str(f.labels),
                     "--moving-seg", str(m.labels), "--model", str(ckpt), "--steps", "2", "--trajectories", "2",
                     "--prealign", "none", "--device", "cpu", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][-1]["dice_percent"] > report["initial_dice_percent"]
    assert (out / "step_02" / "warped_seg.nii.gz").exists()
    assert report["settings"]["crop_margin"] == defaults.CROP_MARGIN  # the content box by default
    code = cli.main(["register", "--fixed", str(f.image), "--moving", str(m.image), "--model", str(ckpt),
                     "--steps", "1", "--prealign", "none", "--device", "cpu", "--no-crop", "--out", str(tmp_path / "whole")])
    assert code == 0 and json.loads((tmp_path / "whole" / "report.json").read_text())["settings"]["crop_margin"] is None

    code = cli.main(["evaluate", "--data", str(dataset_path), "--model", str(ckpt), "--steps", "1",
                     "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert code == 0
    summary = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert summary["pairs"] == len(dataset.val_pairs)
    assert set(summary["per_step"]["1"]) == {"dice", "njd_percent", "sd_log_j", "hd95_mm"}
    assert (tmp_path / "eval" / "evaluation.csv").read_text().count("\n") == 1 + 2 * len(dataset.val_pairs)


def test_cli_reports_bad_input_by_name(tmp_path, capsys):
    code = cli.main(["register", "--fixed", str(tmp_path / "nope.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                     "--model", str(tmp_path / "x.pt"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope.nii.gz" in capsys.readouterr().err
    for command in ["warmup", "finetune", "register", "evaluate", "demo"]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"])
        assert exit_info.value.code == 0


def test_warmup_cancelled_before_its_first_iteration_writes_nothing(dataset_path, tmp_path):
    out = tmp_path / "never.pt"
    config = WarmupConfig(grid=GRID, iterations=5, validate_every=0)
    with pytest.raises(Cancelled):
        warmup(build_model({"backbone": "tiny"}), load_dataset(dataset_path), config, out, cancel=lambda: True)
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_demo_runs_end_to_end_on_the_brain_sample_with_a_tiny_model(tmp_path):
    # the demo's own flow on the shipped brain sample; a tiny model on an 8 mm grid keeps it short
    model = tmp_path / "tiny.pt"
    save_checkpoint(model, build_model({"backbone": "tiny"}),
                    {"spacing": 8.0, "similarity": "ncc", "window": 3, "lambda_reg": 1.0, "stage": "warmup"})
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--model", str(model), "--steps", "2", "--adapt", "3",
                     "--episodes", "1", "--trajectories", "2", "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["episodes"] == 1 and report["pair"] == "09_to_10"
    kinds = [s["kind"] for s in report["registrations"]["finetuned"]["steps"]]
    assert kinds == ["network", "network", "adapt"]
    assert report["summary"]["no_registration_dice"] > 30  # the held-back brain pair, 31 structures
    assert (out / "model-finetuned.safetensors").exists() and (out / "model-finetuned.json").exists()
    assert (out / "09_to_10" / "displacement.nii.gz").exists()
    pngs = list(out.glob("*.png"))
    assert pngs and pngs[0].stat().st_size > 10_000


def test_cli_warmup_then_finetune_on_a_labelled_folder(dataset_path, tmp_path):
    warm, ft = tmp_path / "warm.pt", tmp_path / "ft.pt"
    assert cli.main(["warmup", "--data", str(dataset_path), "--out", str(warm), "--backbone", "tiny",
                     "--grid", "32", "--iterations", "3", "--device", "cpu"]) == 0
    _, config, _ = load_checkpoint(warm)
    assert config.stage == "warmup" and config.grid == (32, 32, 32)
    rows = [json.loads(line) for line in warm.with_suffix(".log.jsonl").read_text().splitlines()]
    assert "val_dice" in rows[-1]  # the last iteration validates on the held-back pairs
    assert cli.main(["finetune", "--model", str(warm), "--data", str(dataset_path), "--out", str(ft),
                     "--steps", "2", "--trajectories", "2", "--episodes", "1", "--device", "cpu",
                     "--lambda-reg", "2", "--no-progress"]) == 0
    _, config, extra = load_checkpoint(ft)
    assert config.stage == "finetune" and config.grpo["trajectories"] == 2
    assert config.grpo["lambda_reg"] == 2.0  # L_warm's diffusion weight, not the warm-up's


def test_cli_turns_out_of_memory_into_a_clear_message(monkeypatch, capsys, tmp_path):
    def exhausted(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def other_failure(args):
        raise RuntimeError("shape mismatch")

    for run, expect_exit in ((exhausted, 2), (other_failure, None)):
        monkeypatch.setattr(cli, "_run_register", run)  # what `morphseek register` runs
        argv = ["register", "--fixed", "f", "--moving", "m", "--model", "x", "--out", str(tmp_path)]
        if expect_exit is None:
            with pytest.raises(RuntimeError, match="shape mismatch"):  # not hidden behind a generic message
                cli.main(argv)
        else:
            assert cli.main(argv) == expect_exit
            err = capsys.readouterr().err
            assert "out of memory" in err and "--grid" in err and "20.00 GiB" in err
