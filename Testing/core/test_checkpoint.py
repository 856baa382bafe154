"""Checkpoints: round trip, resume state, atomic writes, safe loading, clear errors; devices."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import morphseek.checkpoint as checkpoint_module
from morphseek.checkpoint import FORMAT_VERSION, load_checkpoint, resolve_device, save_checkpoint
from morphseek.errors import MorphSeekError
from morphseek.nets import build_model

torch.manual_seed(0)


def trained_model(config: dict | None = None, grid=(16, 16, 32)):
    """A model after one Adam step with a perturbed flow layer (so outputs are far from zero)."""
    model = build_model(config or {"backbone": "tiny", "lambda_scale": 2.5})
    with torch.no_grad():
        model.backbone.flow.weight.normal_(0, 0.05)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(1, 1, *grid, generator=g), torch.rand(1, 1, *grid, generator=g)
    model(moving, fixed, tau=0.3).square().mean().backward()
    optimiser.step()
    return model, optimiser, (moving, fixed)


RUN_CONFIG = {
    "grid": [16, 16, 32],
    "normalisation": {"low": 1.0, "high": 99.0},
    "similarity": "mse",
    "learning_rate": np.float32(1e-4),  # NumPy scalars are stored as Python numbers
    "data": Path("/some/data"),  # paths as strings
}


SMALL_TRANSMORPH = {"backbone": "transmorph-tiny", "depths": [2, 1], "heads": [2, 2], "window": [2, 2, 3]}


@pytest.mark.parametrize(
    "config,grid", [({"backbone": "tiny", "lambda_scale": 2.5}, (16, 16, 32)), (SMALL_TRANSMORPH, (16, 16, 24))]
)
def test_round_trip_gives_identical_outputs_and_resume_state(tmp_path, config, grid):
    model, optimiser, (moving, fixed) = trained_model(config, grid)
    np_state = np.random.RandomState(3).get_state()
    torch_rng = torch.get_rng_state()
    state = {
        "iteration": 17,
        "history": [{"loss": 0.5, "dice": None}],
        "torch_rng": torch_rng,
        "python_rng": random.Random(2).getstate(),
        "numpy_rng": np_state,
    }
    path = save_checkpoint(tmp_path / "sub" / "model.pt", model, RUN_CONFIG, optimizer=optimiser, state=state)
    assert path == tmp_path / "sub" / "model.pt" and path.is_file()
    assert sorted(os.listdir(path.parent)) == ["model.pt"]  # no temporary file left behind

    loaded, run_config, extra = load_checkpoint(path)
    assert loaded.config == model.config
    assert run_config["grid"] == [16, 16, 32] and run_config["data"] == "/some/data"
    assert run_config["learning_rate"] == pytest.approx(1e-4) and type(run_config["learning_rate"]) is float
    assert loaded.training_config == run_config
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(moving, fixed), model(moving, fixed))
        g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
        assert torch.equal(loaded(moving, fixed, 0.5, g1), model(moving, fixed, 0.5, g2))

    assert extra["format_version"] == FORMAT_VERSION and extra["morphseek_version"]
    saved_state = extra["state"]
    assert saved_state["iteration"] == 17 and saved_state["history"] == [{"loss": 0.5, "dice": None}]
    assert torch.equal(saved_state["torch_rng"], torch_rng)
    python_rng = random.Random()
    python_rng.setstate(saved_state["python_rng"])
    assert python_rng.random() == random.Random(2).random()
    restored = np.random.RandomState()
    restored.set_state((np_state[0], saved_state["numpy_rng"][1].numpy(), *saved_state["numpy_rng"][2:]))
    assert restored.randint(1 << 30) == np.random.RandomState(3).randint(1 << 30)

    # The optimiser resumes exactly: same Adam moments on a fresh optimiser for the loaded model.
    resumed = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    resumed.load_state_dict(extra["optimizer"])
    for key, value in optimiser.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(resumed.state_dict()["state"][key][name], tensor)


def test_checkpoint_loads_with_weights_only_and_overwrites_atomically(tmp_path):
    model, _, _ = trained_model()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"epoch": 1})
    payload = torch.load(path, weights_only=True)  # no pickled code anywhere in the file
    assert set(payload) >= {"format_version", "model_config", "config", "state_dict", "optimizer", "state"}
    assert payload["optimizer"] is None and payload["state"] is None
    _, _, extra = load_checkpoint(path)
    assert extra["optimizer"] is None and extra["state"] == {}

    save_checkpoint(path, model, {"epoch": 2})
    assert load_checkpoint(path)[1] == {"epoch": 2}
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, _, _ = trained_model()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, {"epoch": 1})
    before = path.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", broken_save)
    with pytest.raises(MorphSeekError, match="model.pt.*disk full"):
        save_checkpoint(path, model, {"epoch": 2})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


def test_unstorable_values_are_refused_with_their_location(tmp_path):
    model, _, _ = trained_model()
    with pytest.raises(MorphSeekError, match=r"state\['callback'\]"):
        save_checkpoint(tmp_path / "m.pt", model, {}, state={"callback": print})
    with pytest.raises(MorphSeekError, match="MorphSeekNet"):
        save_checkpoint(tmp_path / "m.pt", model.backbone, {})
    assert not (tmp_path / "m.pt").exists()


def test_missing_and_corrupt_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(MorphSeekError, match=r"nope\.pt.*not found"):
        load_checkpoint(missing)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file at all" * 10)
    with pytest.raises(MorphSeekError, match=r"garbage\.pt.*cannot be read"):
        load_checkpoint(garbage)

    model, _, _ = trained_model()
    good = save_checkpoint(tmp_path / "good.pt", model, {})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MorphSeekError, match=r"truncated\.pt.*cannot be read"):
        load_checkpoint(truncated)


class NotAllowed:
    """A pickled object of an arbitrary class: weights_only loading must refuse it."""


def test_foreign_and_unsafe_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(MorphSeekError, match=r"other\.pt.*not a MorphSeek checkpoint"):
        load_checkpoint(other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format_version": FORMAT_VERSION, "payload": NotAllowed()}, unsafe)
    with pytest.raises(MorphSeekError, match=r"unsafe\.pt.*cannot be read"):
        load_checkpoint(unsafe)


def _rewrite(path: Path, change) -> Path:
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


def test_wrong_version_and_mismatched_weights(tmp_path):
    model, _, _ = trained_model()
    path = save_checkpoint(tmp_path / "m.pt", model, {})

    _rewrite(path, lambda p: p.update(format_version=99))
    with pytest.raises(MorphSeekError, match=r"m\.pt.*format version 99.*reads version 1"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p["model_config"].update(enc_channels=[8, 16, 16, 32]))
    with pytest.raises(MorphSeekError, match=r"m\.pt.*do not match"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p["state_dict"].pop("head.mu_conv.weight"))
    with pytest.raises(MorphSeekError, match=r"(?s)m\.pt.*do not match.*head\.mu_conv\.weight"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p["model_config"].update(backbone="unet9000"))
    with pytest.raises(MorphSeekError, match=r"m\.pt.*unknown backbone"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p.pop("state_dict"))
    with pytest.raises(MorphSeekError, match=r"m\.pt.*missing state_dict"):
        load_checkpoint(path)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(MorphSeekError, match="unknown device"):
        resolve_device("gpu-please")
    with pytest.raises(MorphSeekError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        for spec in ("cuda", "cuda:0", " CUDA:1 "):
            with pytest.raises(MorphSeekError, match="CUDA is not available"):
                resolve_device(spec)
    # With one (pretended) GPU: auto picks it, an index beyond it is refused.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(MorphSeekError, match="only 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error when no GPU is present")
def test_loading_onto_absent_gpu_is_a_clear_error(tmp_path):
    model, _, _ = trained_model()
    path = save_checkpoint(tmp_path / "m.pt", model, {})
    with pytest.raises(MorphSeekError, match="CUDA is not available"):
        load_checkpoint(path, device="cuda")
