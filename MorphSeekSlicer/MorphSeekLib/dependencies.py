"""What the engine needs inside Slicer's Python, and how to get it: PyTorch through the PyTorch
extension's ``PyTorchUtils`` (it picks the build that matches the GPU and its driver) when that
extension is installed, else pip; the engine's small pure-Python requirements through pip.

Nothing here runs at import time: the widget asks the user first (``missing()`` then ``install``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable

# Import name -> pip requirement. numpy and SimpleITK ship with Slicer.
ENGINE_REQUIREMENTS = {"tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENT = "torch"


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


def missing() -> list[str]:
    """Import names of what is not installed yet (torch first)."""
    names = ["torch"] + list(ENGINE_REQUIREMENTS)
    return [name for name in names if importlib.util.find_spec(name) is None]


def install(names: list[str], pip_install: Callable[[str], None], pytorch_utils=None) -> None:
    """Install ``names`` (from ``missing()``). ``pip_install`` is ``slicer.util.pip_install``;
    ``pytorch_utils`` the PyTorchUtils module when the PyTorch extension is present."""
    for name in names:
        if name == "torch":
            if pytorch_utils is not None:
                torch_module = pytorch_utils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
                if torch_module is None:
                    raise RuntimeError("PyTorch could not be installed by the PyTorch extension")
            else:
                pip_install(TORCH_REQUIREMENT)
        else:
            pip_install(ENGINE_REQUIREMENTS[name])
    importlib.invalidate_caches()
