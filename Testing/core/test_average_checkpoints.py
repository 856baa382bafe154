"""scripts/average_checkpoints.py: the tail average of one run's checkpoints (docs/QUALITY.md section 22)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from morphseek.checkpoint import load_checkpoint, save_checkpoint
from morphseek.errors import MorphSeekError
from morphseek.nets.registry import build_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "average_checkpoints.py"
spec = importlib.util.spec_from_file_location("average_checkpoints", SCRIPT)
average_checkpoints = importlib.util.module_from_spec(spec)
spec.loader.exec_module(average_checkpoints)


def test_the_average_of_three_checkpoints_is_the_mean_of_their_weights(tmp_path):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model({"backbone": "tiny"})
        save_checkpoint(tmp_path / f"ep{seed}", model, None)
        models.append(model.state_dict())
    assert average_checkpoints.main([str(tmp_path / f"ep{i}") for i in range(3)] + ["--out", str(tmp_path / "avg")]) == 0
    averaged = load_checkpoint(tmp_path / "avg")[0].state_dict()
    for key, value in averaged.items():
        if value.is_floating_point():
            expected = (models[0][key] + models[1][key] + models[2][key]) / 3
            assert torch.allclose(value, expected, atol=1e-7), key
    some = next(k for k, v in averaged.items() if v.is_floating_point() and v.numel() > 1)
    assert not torch.equal(averaged[some], models[2][some])  # really averaged, not the last one


def test_checkpoints_of_other_architectures_are_refused_by_name(tmp_path, capsys):
    save_checkpoint(tmp_path / "tiny", build_model({"backbone": "tiny"}), None)
    save_checkpoint(tmp_path / "vm", build_model({"backbone": "voxelmorph"}), None)
    with pytest.raises(MorphSeekError, match="vm.*do not match"):
        average_checkpoints.average_state([build_model({"backbone": "tiny"}).state_dict(),
                                           build_model({"backbone": "voxelmorph"}).state_dict()],
                                          [str(tmp_path / "tiny"), str(tmp_path / "vm")])
    assert average_checkpoints.main([str(tmp_path / "tiny"), str(tmp_path / "vm"), "--out", str(tmp_path / "a")]) == 2
    assert "do not match" in capsys.readouterr().err and not (tmp_path / "a.safetensors").exists()
