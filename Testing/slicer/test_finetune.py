"""Fine-tuning from the module's logic with the real engine: warm-up then GRPO on a few labelled
synthetic cases, progress for the live plot, the checkpoint written and usable; cancel stops it."""

from __future__ import annotations

import pytest
from morphseek.errors import Cancelled

from MorphSeekLib import preview
from MorphSeekLib.logic import SceneLogic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from morphseek.synth import write_dataset

    folder = tmp_path_factory.mktemp("cases")
    write_dataset(folder, n_subjects=3, shape=(32, 32, 32), seed=0, n_labels=4)
    return folder


@pytest.mark.slow
def test_finetune_writes_a_checkpoint_and_reports_progress(case, dataset, tmp_path, scene):
    _, _, model = case
    events = []
    out = tmp_path / "tuned.safetensors"
    result = SceneLogic.finetune(dataset, model, out, warmup_iterations=1, episodes=1, steps=1,
                                     trajectories=2, device="cpu", progress=events.append)
    assert out.is_file() and result.done == 1 and result.checkpoint == out
    stages = [e["stage"] for e in events]
    assert stages.count("warmup") >= 1 and stages.count("grpo") == 1
    assert events[-1]["done"] == events[-1]["total"] == 1
    chart = preview.training_plot(scene, [e for e in events if e["stage"] == "grpo"])
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(0).GetTableNode().GetNumberOfRows() == 1
    from morphseek.checkpoint import load_checkpoint

    load_checkpoint(out)  # loads back as a model


def test_finetune_cancel_stops(case, dataset, tmp_path):
    _, _, model = case
    with pytest.raises(Cancelled):
        SceneLogic.finetune(dataset, model, tmp_path / "never.pt", episodes=5, steps=1, trajectories=2,
                            device="cpu", cancel=lambda: True)
    assert not (tmp_path / "never.pt").exists() and list(tmp_path.iterdir()) == []
