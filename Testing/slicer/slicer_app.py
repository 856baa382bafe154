"""Slicer's own Python sources on top of slicer-core, as the desktop application has them.

``install()`` loads Slicer v5.10's ``ScriptedLoadableModule.py``, ``parameterNodeWrapper/`` and
``i18n.py`` (unmodified, from ../shared/slicer-python, or MORPHSEEK_SLICER_PYTHON) as submodules
of the real ``slicer`` package of slicer-core, and gives ``qt`` and ``ctk`` the thinnest import
shims (every attribute is a distinct placeholder class that accepts any arguments; the same for
the application's ``slicer.qMRML*`` widget classes). ``slicer.app``
is a stand-in that records ``connect`` calls and returns texts untranslated. Nothing of Slicer's own
code is replaced, so what the desktop application would raise on importing the module file or
building its classes is raised here too.

``block_torch()`` makes ``import torch`` fail as it does in a fresh Slicer (the PyTorch extension
brings only PyTorchUtils); run it in a subprocess (tests: ``python slicer_app.py SCRIPT``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLICER_PYTHON = Path(os.environ.get("MORPHSEEK_SLICER_PYTHON", REPO.parent / "shared" / "slicer-python"))
MODULE_DIR = REPO / "MorphSeekSlicer"


# The Qt widget classes of the slicer package that Slicer's own Python sources name.
QT_WIDGET_CLASSES = ("qMRMLNodeComboBox", "qMRMLRangeWidget", "qMRMLScreenShotDialog", "qMRMLSliderWidget",
                     "qMRMLSpinBox", "qMRMLUtils", "qMRMLWidget", "qSlicerWidget")


def available() -> bool:
    return (SLICER_PYTHON / "slicer" / "ScriptedLoadableModule.py").is_file()


class _TorchBlocker(importlib.abc.MetaPathFinder):
    """``import torch`` (and its submodules) raises ModuleNotFoundError, and find_spec says None."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named '{name}' (blocked: Slicer without PyTorch)", name=name)
        return None


def block_torch() -> None:
    if "torch" in sys.modules:
        raise RuntimeError("torch is already imported: block it before anything imports it")
    sys.meta_path.insert(0, _TorchBlocker())
    # importlib.util.find_spec("torch") must say "not installed" (dependencies.missing() asks it).
    original = importlib.util.find_spec

    def find_spec(name, package=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return original(name, package)

    importlib.util.find_spec = find_spec


class _Placeholder:
    """A Qt/CTK class stand-in: any arguments, any attribute."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __getattr__(self, name):
        return _Placeholder()

    def __call__(self, *args, **kwargs):
        return _Placeholder()


def _shim_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__doc__ = f"import shim for {name} (tests without Qt)"
    classes: dict[str, type] = {}

    def __getattr__(attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        if attribute not in classes:
            classes[attribute] = type(attribute, (_Placeholder,), {"__module__": name})
        return classes[attribute]

    module.__getattr__ = __getattr__
    return module


class Application:
    """``slicer.app``: what the module file and Slicer's i18n touch."""

    def __init__(self, temporary_path: str):
        self.connections: list[tuple[str, object]] = []
        self.temporaryPath = temporary_path

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))

    def translate(self, context: str, text: str) -> str:
        return text

    def moduleManager(self) -> "Application":
        """The widget base class connects to the module manager's unload signal: recorded too."""
        return self

    def disconnect(self, signal: str, slot) -> None:
        self.connections.remove((signal, slot))

    def startupEnvironment(self) -> "_Environment":
        """The environment Slicer was started in (here: this process's)."""
        return _Environment(dict(os.environ))


class _Environment:
    """What ``slicer.util.startupEnvironment`` reads of a QProcessEnvironment."""

    def __init__(self, values: dict):
        self._values = values

    def keys(self) -> list[str]:
        return list(self._values)

    def value(self, name: str) -> str:
        return self._values[name]


def _load(name: str, path: Path, package_dir: Path | None = None):
    spec = importlib.util.spec_from_file_location(
        name, path, submodule_search_locations=[str(package_dir)] if package_dir else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def install(temporary_path: str = "/tmp"):
    """Slicer's Python layer on slicer-core; returns the ``slicer`` package."""
    if not available():
        raise FileNotFoundError(f"Slicer's Python sources are not in {SLICER_PYTHON}")
    for name in ("qt", "ctk"):
        sys.modules.setdefault(name, _shim_module(name))
    import slicer
    import slicer.util  # noqa: F401 - slicer-core's util: VTKObservationMixin, arrayFromVolume...

    # The application's Qt widget classes (qMRML*): placeholders like those of qt and ctk.
    widgets = _shim_module("slicer (Qt widgets)")
    for name in QT_WIDGET_CLASSES:
        if not hasattr(slicer, name):
            setattr(slicer, name, getattr(widgets, name))
    if not hasattr(slicer, "app"):
        slicer.app = Application(temporary_path)
    if getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()
    source = SLICER_PYTHON / "slicer"
    slicer.i18n = _load("slicer.i18n", source / "i18n.py")
    wrapper_dir = source / "parameterNodeWrapper"
    slicer.parameterNodeWrapper = _load("slicer.parameterNodeWrapper", wrapper_dir / "__init__.py", wrapper_dir)
    slicer.ScriptedLoadableModule = _load("slicer.ScriptedLoadableModule", source / "ScriptedLoadableModule.py")
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    return slicer


def load_module_file():
    """Import MorphSeekSlicer/MorphSeek.py as Slicer does (module name ``MorphSeek``)."""
    return _load("MorphSeek", MODULE_DIR / "MorphSeek.py")


class ModuleParent:
    """The qSlicerScriptedLoadableModule a module class receives (the attributes it sets)."""

    def __init__(self):
        self.path = str(MODULE_DIR / "MorphSeek.py")


if __name__ == "__main__":  # python slicer_app.py SCRIPT [--no-torch]: run SCRIPT with Slicer's layer
    script = Path(sys.argv[1])
    if "--no-torch" in sys.argv:
        block_torch()
    sys.path.insert(0, str(Path(__file__).parent))
    namespace = {"__name__": "__main__", "__file__": str(script)}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
