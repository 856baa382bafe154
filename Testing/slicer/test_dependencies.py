"""MorphSeekLib.dependencies: what a Slicer without the engine's packages is offered, and how each one
is installed (no Slicer needed: pip and PyTorchUtils are recorded, not run)."""

from __future__ import annotations

import importlib.util

from MorphSeekLib import dependencies


def test_missing_names_torch_and_the_packages_slicer_does_not_ship(monkeypatch):
    real = importlib.util.find_spec
    absent = {"torch", "safetensors", "tqdm"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    assert dependencies.missing() == ["torch", "safetensors", "tqdm"]
    absent = {"safetensors"}  # torch there (a recent one), safetensors not: the weights cannot be read
    monkeypatch.setattr(dependencies, "torch_version", lambda: "2.13.0")
    assert dependencies.missing() == ["safetensors"]
    absent = set()
    assert dependencies.missing() == []


def test_install_uses_pytorch_utils_for_torch_and_pip_for_the_rest():
    pip, torch_requests = [], []

    class Logic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            torch_requests.append(torchVersionRequirement)
            return object()

    class PyTorchUtils:
        PyTorchUtilsLogic = Logic

    dependencies.install(["torch", "safetensors", "tqdm"], pip.append, PyTorchUtils)
    assert torch_requests == [f">={dependencies.TORCH_MINIMUM}"]
    assert pip == ["safetensors>=0.4", "tqdm>=4.60"]
    pip.clear()
    dependencies.install(["torch"], pip.append, None)  # no PyTorch extension: pip
    assert pip == [dependencies.TORCH_REQUIREMENT]
