"""What the engine needs inside Slicer's Python, and how to get it: PyTorch through the PyTorch
extension's ``PyTorchUtils`` (it picks the build that matches the GPU and its driver) when that
extension is installed, else pip; safetensors (every model's weights) and tqdm (imported by the
training code that fine-tuning runs) from pip. NumPy and SimpleITK ship with Slicer. h5py and
matplotlib are not needed: the module writes its transform with Slicer's own storage node and
makes no montage.

Nothing here runs at import time: the widget asks the user first (``missing()`` then ``install``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Callable

# The oldest torch the engine is written for (docs/SLICER-MODULE.md, "Supported Slicer versions"):
# Slicer 5.8 and 5.10 bring Python 3.12, for which torch has wheels from 2.2 on; the engine uses
# nothing newer (checked API by API: docs/SLICER-MODULE.md).
TORCH_MINIMUM = "2.2"
TORCH_REQUIREMENT = f"torch>={TORCH_MINIMUM}"
#: The engine's other packages that Slicer does not ship -> what pip installs (MorphSeekCore/pyproject.toml).
PIP_REQUIREMENTS = {"safetensors": "safetensors>=0.4", "tqdm": "tqdm>=4.60"}


def add_source_engine_to_path() -> Path | None:
    """When the module runs from a source checkout ("Additional module paths"), make the engine in
    ``MorphSeekCore/`` next to it importable. Returns the folder added, if any."""
    if importlib.util.find_spec("morphseek") is not None:
        return None
    engine = Path(__file__).resolve().parents[2] / "MorphSeekCore"
    if (engine / "morphseek" / "__init__.py").is_file():
        sys.path.insert(0, str(engine))
        importlib.invalidate_caches()
        return engine
    return None


def torch_version() -> str | None:
    """The installed torch's version, read from its package metadata (torch is not imported)."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _older_than(version: str, minimum: str) -> bool:
    def numbers(text: str) -> tuple[int, ...]:
        parts = []
        for part in text.split("+")[0].split(".")[:3]:
            digits = "".join(ch for ch in part if ch.isdigit())
            parts.append(int(digits) if digits else 0)
        return tuple(parts)

    return numbers(version) < numbers(minimum)


def missing() -> list[str]:
    """What must be installed before a job can run: ``"torch"`` when torch is absent or older than
    ``TORCH_MINIMUM`` (checked without importing it), and each of ``PIP_REQUIREMENTS`` that is
    absent; empty when nothing is."""
    names = []
    version = torch_version()
    if version is None or (version != "unknown" and _older_than(version, TORCH_MINIMUM)):
        names.append("torch")
    names += [name for name in PIP_REQUIREMENTS if importlib.util.find_spec(name) is None]
    return names


def install(names: list[str], pip_install: Callable[[str], None], pytorch_utils=None) -> None:
    """Install ``names`` (from ``missing()``). ``pip_install`` is ``slicer.util.pip_install``;
    ``pytorch_utils`` the PyTorchUtils module when the PyTorch extension is present."""
    for name in names:
        if name == "torch":
            if pytorch_utils is not None:
                torch_module = pytorch_utils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=f">={TORCH_MINIMUM}")
                if torch_module is None:
                    raise RuntimeError("PyTorch could not be installed by the PyTorch extension")
            else:
                pip_install(TORCH_REQUIREMENT)
        elif name in PIP_REQUIREMENTS:
            pip_install(PIP_REQUIREMENTS[name])
        else:
            raise ValueError(f"MorphSeek does not install {name!r}")
    importlib.invalidate_caches()
