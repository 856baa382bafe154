"""Checkpoints: round trip, resume state, atomic writes, safe loading, clear errors; devices."""

from __future__ import annotations

import json
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
from morphseek.runconfig import RunConfig

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
    assert path == tmp_path / "sub" / "model.safetensors" and path.is_file()
    # two files, no temporary file left behind
    assert sorted(os.listdir(path.parent)) == ["model.json", "model.safetensors"]
    for name in ("model.pt", "model", "model.json", "model.safetensors"):  # every name of it loads it
        assert load_checkpoint(tmp_path / "sub" / name)[2]["path"] == path

    loaded, run_config, extra = load_checkpoint(path)
    assert loaded.config == model.config
    assert run_config.grid == (16, 16, 32) and run_config.record["data"] == "/some/data"
    assert run_config.record["learning_rate"] == pytest.approx(1e-4) and type(run_config.record["learning_rate"]) is float
    assert loaded.run_config == run_config
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


def test_checkpoint_is_safetensors_plus_json_and_overwrites_atomically(tmp_path):
    from safetensors import safe_open

    model, _, _ = trained_model()
    path = save_checkpoint(tmp_path / "model", model, {"epoch": 1})
    with safe_open(str(path), framework="pt") as handle:  # no pickled code anywhere: raw tensors + JSON
        assert handle.metadata()["format"] == "morphseek"
        assert {k for k in handle.keys() if k.startswith("model/")} == {f"model/{k}" for k in model.state_dict()}
    readable = json.loads((tmp_path / "model.json").read_text())
    assert readable["config"] == RunConfig(record={"epoch": 1}).to_dict() and readable["weights"] == "model.safetensors"
    assert readable["model_config"] == model.config and not readable["resumable"]
    _, _, extra = load_checkpoint(path)
    assert extra["optimizer"] is None and extra["state"] == {}

    save_checkpoint(path, model, {"epoch": 2})
    assert load_checkpoint(path)[1].record == {"epoch": 2}
    assert sorted(os.listdir(tmp_path)) == ["model.json", "model.safetensors"]


def test_legacy_pt_checkpoint_still_loads(tmp_path):
    """Format 1 (MorphSeek 0.1): one torch.save file of plain values, read with weights_only=True."""
    model, _, (moving, fixed) = trained_model()
    legacy = tmp_path / "old.pt"
    torch.save({"format_version": 1, "model_config": model.config, "config": {"grid": [16, 16, 32]},
                "state_dict": model.state_dict(), "optimizer": None, "state": {"iteration": 3},
                "morphseek_version": "0.1.0", "torch_version": str(torch.__version__)}, legacy)
    loaded, config, extra = load_checkpoint(legacy)
    assert config == RunConfig(grid=(16, 16, 32)) and extra["state"] == {"iteration": 3} and extra["format_version"] == 1
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(moving, fixed), model(moving, fixed))
    # Saving under the same name writes the new format beside it, and that is what loads from then on.
    save_checkpoint(legacy, loaded, {"grid": [16, 16, 32], "new": True})
    assert load_checkpoint(legacy)[1].record["new"] is True


def test_stale_or_mismatched_json_beside_the_weights(tmp_path):
    model, _, _ = trained_model()
    path = save_checkpoint(tmp_path / "m", model, {"epoch": 1})
    sidecar = tmp_path / "m.json"
    old = sidecar.read_text()
    save_checkpoint(path, model, {"epoch": 2})
    sidecar.write_text(old)  # a run killed between the two renames: the .json of the previous save
    assert load_checkpoint(path)[1].record == {"epoch": 2}  # the weights' own header is the record
    save_checkpoint(path, model, {"epoch": 3})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    with pytest.raises(MorphSeekError, match=r"m\.safetensors.*checksum does not match.*m\.json"):
        load_checkpoint(path)


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, _, _ = trained_model()
    path = save_checkpoint(tmp_path / "model.pt", model, {"epoch": 1})
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.os, "fsync", disk_full)
    with pytest.raises(MorphSeekError, match=r"model\.safetensors.*No space left.*disk full"):
        save_checkpoint(path, model, {"epoch": 2})
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    monkeypatch.undo()
    assert load_checkpoint(path)[1].record == {"epoch": 1}


def test_unstorable_values_are_refused_with_their_location(tmp_path):
    model, _, _ = trained_model()
    with pytest.raises(MorphSeekError, match=r"state\['callback'\]"):
        save_checkpoint(tmp_path / "m.pt", model, {}, state={"callback": print})
    with pytest.raises(MorphSeekError, match="MorphSeekNet"):
        save_checkpoint(tmp_path / "m.pt", model.backbone, {})
    assert not list(tmp_path.iterdir())


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
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MorphSeekError, match=r"truncated\.safetensors.*cannot be read"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.safetensors"  # a safetensors file from another tool
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(MorphSeekError, match=r"foreign\.safetensors.*not a MorphSeek checkpoint"):
        load_checkpoint(foreign)


class NotAllowed:
    """A pickled object of an arbitrary class: weights_only loading must refuse it."""


def test_foreign_and_unsafe_files_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(MorphSeekError, match=r"other\.pt.*not a MorphSeek checkpoint"):
        load_checkpoint(other)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format_version": FORMAT_VERSION, "payload": NotAllowed()}, unsafe)
    with pytest.raises(MorphSeekError, match=r"unsafe\.pt.*refused.*could run code") as info:
        load_checkpoint(unsafe)
    assert "weights_only" not in str(info.value)  # never PyTorch's advice to load it unsafely


def _rewrite(path: Path, change) -> Path:
    """Edit a saved checkpoint: ``change`` gets {"format_version", "model_config", ..., "state_dict"}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        document = json.loads(handle.metadata()["morphseek"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    document["state_dict"] = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    change(document)
    document["save_id"] = "edited"  # the .json beside it now describes an earlier save and is ignored
    others = {k: v for k, v in tensors.items() if not k.startswith("model/")}
    weights = {f"model/{k}": v for k, v in document.pop("state_dict", {}).items()}
    save_file({**weights, **others}, str(path), metadata={"format": "morphseek", "morphseek": json.dumps(document)})
    return path


def test_wrong_version_and_mismatched_weights(tmp_path):
    model, _, _ = trained_model()
    path = save_checkpoint(tmp_path / "m.pt", model, {})

    _rewrite(path, lambda p: p.update(format_version=99))
    with pytest.raises(MorphSeekError, match=r"m\.safetensors.*format version 99.*reads version 2"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p["model_config"].update(enc_channels=[8, 16, 16, 32]))
    with pytest.raises(MorphSeekError, match=r"m\.safetensors.*do not match"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p["state_dict"].pop("head.mu_conv.weight"))
    with pytest.raises(MorphSeekError, match=r"(?s)m\.safetensors.*do not match.*head\.mu_conv\.weight"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p["model_config"].update(backbone="unet9000"))
    with pytest.raises(MorphSeekError, match=r"m\.safetensors.*unknown backbone"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m.pt", model, {})
    _rewrite(path, lambda p: p.pop("state_dict"))
    with pytest.raises(MorphSeekError, match=r"m\.safetensors.*missing state_dict"):
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


@pytest.mark.parametrize("config, message", [
    ({"grid": [16, 16]}, r"grid \[16, 16\] is not three sizes"),
    ({"grid": "abc"}, r"grid 'abc' is not three sizes"),
    ({"percentiles": [99, 1]}, r"percentiles \[99, 1\] are not two numbers 0 <= low < high <= 100"),
    ({"similarity": "ssim"}, r"unknown similarity 'ssim' \(mse, ncc or mind\)"),
    ({"lambda_reg": float("nan")}, r"lambda_reg is nan"),
    ({"learning_rate": float("inf")}, r"learning_rate is inf"),
    ({"spacing": "wide"}, r"spacing 'wide' is not a float"),
    ([16, 16, 16], r"is a list, not a mapping"),
])
def test_run_config_refuses_what_cannot_work(config, message):
    with pytest.raises(MorphSeekError, match=r"^checkpoint m\.safetensors: its configuration" + ".*" + message):
        RunConfig.from_dict(config, "checkpoint m.safetensors")


def test_run_config_reads_older_keys_and_keeps_unknown_ones():
    old = {"stage": "warmup", "grid": [8, 8, 8], "lr": 1e-3, "val_every": 5, "data": "/d"}
    config = RunConfig.from_dict(old)
    assert config.stage == "warmup" and config.grid == (8, 8, 8)
    assert config.record == {"learning_rate": 1e-3, "validate_every": 5, "data": "/d"}
    # what it says nothing about takes the defaults (defaults.py), the same for every reader
    assert (config.similarity, config.percentiles, config.spacing) == ("mse", (1.0, 99.0), None)
    assert RunConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", ["morphseek-default", "morphseek-brain"])
def test_shipped_models_load_with_their_run_configuration(name):
    models = Path(__file__).resolve().parents[2] / "Resources" / "Models"
    saved = json.loads((models / f"{name}.json").read_text())["config"]
    model, config, _ = load_checkpoint(models / name)
    assert model.run_config is config and config.stage == saved["stage"]
    assert config.grid == tuple(saved["grid"]) and config.similarity == saved["similarity"]
    assert config.spacing == saved.get("spacing") and config.lambda_reg == saved["lambda_reg"]
    assert config.presmooth == saved.get("presmooth", 0.0) and config.window == saved.get("window", 9)
    assert config.clean_similarity == saved.get("clean_similarity", False)
    if saved.get("grpo") is not None:
        assert config.grpo["trajectories"] == saved["grpo"]["trajectories"]
    # every saved key is written back unchanged; keys the file lacks take their defaults
    written = config.to_dict()
    assert {key: written[key] for key in saved} == saved
    assert set(written) - set(saved) <= {"spacing", "direction", "window", "presmooth", "clean_similarity",
                                         "iterations", "grpo"}
