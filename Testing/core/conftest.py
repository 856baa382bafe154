"""Engine tests: the ``--device`` option.

``pytest Testing/core --device cuda`` runs every test that takes the ``device`` fixture on that
device (the registration and GRPO steps, the device-discipline tests, CPU-vs-device agreement);
the others stay on the CPU, where they check conventions and numbers that do not depend on the
device. Without the option everything runs on the CPU. ``benchmarks/gpu_check.py`` uses it.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="torch device for the tests that take the `device` fixture: cpu (default), cuda, cuda:N")


@pytest.fixture(scope="session")
def device(request):
    """The torch.device given by ``--device`` (a usage error when it is not available)."""
    import torch

    spec = request.config.getoption("--device")
    try:
        dev = torch.device(spec)
    except RuntimeError as error:
        raise pytest.UsageError(f"--device {spec}: {error}") from None
    if dev.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--device {spec}: only cpu and cuda[:N] are supported")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {spec}: CUDA is not available here")
    return dev
