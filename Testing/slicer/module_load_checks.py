"""Run by test_module_load.py in a subprocess through ``slicer_app.py --no-torch``: MorphSeek.py
loaded against Slicer v5.10's own ScriptedLoadableModule, parameterNodeWrapper and i18n, real vtk
and slicer-core, torch unimportable. Each check raises AssertionError with what went wrong."""

import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import slicer_app

slicer = slicer_app.install(tempfile.mkdtemp(prefix="morphseek-app-"))
assert importlib.util.find_spec("torch") is None, "torch should be blocked"
module = slicer_app.load_module_file()
assert "torch" not in sys.modules, "importing MorphSeek.py imported torch"
print("loaded MorphSeek.py without torch")

# The module class, as qSlicerScriptedLoadableModule builds it.
parent = slicer_app.ModuleParent()
module.MorphSeek(parent)
assert parent.title == "MorphSeek" and parent.categories == ["Registration"], (parent.title, parent.categories)
assert "MorphSeek" in slicer.selfTests
assert ("startupCompleted()", module.registerSampleData) in slicer.app.connections

# Sample Data: absent module -> nothing; present -> the shipped pair, from files that exist.
sys.modules["SampleData"] = None  # "import SampleData" raises ImportError, as in a build without it
assert module.registerSampleData() is False
calls = []
sys.modules["SampleData"] = types.SimpleNamespace(SampleDataLogic=types.SimpleNamespace(
    registerCustomSampleDataSource=lambda **kwargs: calls.append(kwargs)))
from MorphSeekLib import selftest  # noqa: E402

if selftest.sample_data_folder() is not None:
    assert module.registerSampleData() is True and len(calls) == 1
    registered = calls[0]
    assert registered["category"] == "MorphSeek" and len(registered["uris"]) == 4
    for uri in registered["uris"]:
        assert Path(uri.removeprefix("file://")).is_file(), uri
    assert registered["loadFileType"] == ["VolumeFile", "VolumeFile", "SegmentationFile", "SegmentationFile"]
    print("sample pair registered:", registered["nodeNames"])
del sys.modules["SampleData"]

# The logic class with Slicer's real base class, and the parameter node wrapper.
logic = module.MorphSeekLogic()
assert logic.moduleName == "MorphSeek"
parameters = logic.getParameterNode()
assert isinstance(parameters, module.MorphSeekParameterNode)
assert parameters.steps == 3 and parameters.device == "auto" and parameters.prealign is True
assert parameters.fineLastStep is True  # the engine's choice for the model (fine_steps=None)
assert parameters.contentBox is True  # as morphseek register: each step's network on the content box
assert parameters.adaptIterations == 30 and type(parameters.adaptIterations) is int  # noqa: E721
assert parameters.adaptLambda == module.ADAPT_LAMBDA_DEFAULT == 1.5 and type(parameters.adaptLambda) is float  # noqa: E721
counts = ("steps", "trajectories", "adaptIterations", "warmupIterations", "episodes")
assert all(type(getattr(parameters, name)) is int for name in counts), [getattr(parameters, n) for n in counts]  # noqa: E721

# Every widget the .ui binds to a parameter gets a connector from Slicer's own parameterNodeWrapper
# for that parameter's type (what connectGui does in the application: a RuntimeError when none fits,
# e.g. a QSpinBox bound to a float or an unbounded ctkSliderWidget); a bound number shows the
# parameter's default before it is connected.
import xml.etree.ElementTree as ElementTree  # noqa: E402

import ctk  # noqa: E402
import qt  # noqa: E402
from slicer.parameterNodeWrapper.guiConnectors import createGuiConnector  # noqa: E402

ui_root = ElementTree.parse(slicer_app.MODULE_DIR / "Resources" / "UI" / "MorphSeek.ui").getroot()
bindings = {}
for element in ui_root.iter("widget"):
    properties = {p.get("name"): p for p in element.findall("property")}
    if "SlicerParameterName" in properties:
        bindings[properties["SlicerParameterName"].find("string").text] = (element.get("class"), properties)
assert {"steps", "fineLastStep", "contentBox", "trajectories", "adaptIterations", "warmupIterations", "episodes", "fixedVolume"} <= set(bindings)
for name, (widget_class, properties) in bindings.items():
    owner = qt if widget_class.startswith("Q") else ctk if widget_class.startswith("ctk") else slicer
    createGuiConnector(getattr(owner, widget_class)(), module.MorphSeekParameterNode.dataType(name))
    if name in counts:  # the .ui's value and range are the parameter's default and range
        number = {key: float(next(iter(properties[key])).text) for key in ("value", "minimum", "maximum")
                  if key in properties}
        default = getattr(parameters, name)
        assert number.get("value", default) == default, (name, number, default)
        for bound, outside in (("minimum", -1), ("maximum", 1)):
            if bound in number:
                setattr(parameters, name, int(number[bound]))  # accepted
                try:
                    setattr(parameters, name, int(number[bound]) + outside)
                    raise AssertionError(f"{name}: the parameter accepts {number[bound] + outside}, the .ui does not")
                except ValueError:
                    pass
        setattr(parameters, name, default)
assert module.ADAPT_DEFAULT == 30  # as `morphseek demo --adapt`
print("parameter bindings of the .ui connect:", len(bindings))
assert logic.sceneLogic.scene is slicer.mrmlScene
fixed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed CT")
parameters.fixedVolume = fixed
parameters.steps = 5
parameters.trajectories = 4
parameters.temperature = 0.25
parameters.device = "cuda:1"
parameters.modelPath = "/models/tuned.pt"
parameters.prealign = False
parameters.adaptIterations = 45
try:
    parameters.steps = 11
    raise AssertionError("WithinRange(1, 10) accepted 11 steps")
except ValueError:
    pass
for bad in (-1, 501):
    try:
        parameters.adaptIterations = bad
        raise AssertionError(f"WithinRange(0, 500) accepted {bad} test-time optimisation iterations")
    except ValueError:
        pass
assert parameters.adaptIterations == 45

# Round trip through a saved and reloaded scene.
folder = Path(tempfile.mkdtemp(prefix="morphseek-scene-"))
scene_file = folder / "scene.mrml"
slicer.mrmlScene.SetRootDirectory(str(folder))
slicer.mrmlScene.SetURL(str(scene_file))
assert slicer.mrmlScene.Commit(str(scene_file)), "the scene was not written"
reloaded = slicer.vtkMRMLScene()
reloaded.SetURL(str(scene_file))
assert reloaded.Connect(), "the scene did not load"
slicer.mrmlScene = reloaded
restored = module.MorphSeekLogic().getParameterNode()
assert restored.steps == 5 and restored.trajectories == 4 and abs(restored.temperature - 0.25) < 1e-9
assert restored.device == "cuda:1" and restored.modelPath == "/models/tuned.pt" and restored.prealign is False
assert restored.adaptIterations == 45 and type(restored.adaptIterations) is int  # noqa: E721
assert type(restored.steps) is int and type(restored.trajectories) is int  # noqa: E721
assert restored.fixedVolume is not None and restored.fixedVolume.GetName() == "fixed CT"
assert restored.fixedVolume.GetScene() is reloaded
print("parameter node round trip through", scene_file.name, "ok")

# A saved device that this computer does not have stays the saved value and is shown as such.
from MorphSeekLib.logic import device_choices  # noqa: E402

choices = device_choices(None, restored.device)
assert [c.key for c in choices] == ["auto", "cpu", "cuda:1"] and "not checked yet" in choices[-1].label
choices = device_choices([{"key": "cuda:0", "label": "GPU 0: H200 (139 GiB)"}], "cuda:1")
assert [c.key for c in choices] == ["auto", "cpu", "cuda:0", "cuda:1"] and "not detected" in choices[-1].label

# The self-test on a machine without torch: its torch part is skipped with a clear message.
from MorphSeekLib import dependencies  # noqa: E402

assert dependencies.missing() == ["torch"]
test = module.MorphSeekTest()
messages = []
test.delayDisplay = lambda message, *args, **kwargs: messages.append(message)  # the dialog needs Qt
test.runTest()
assert any("PyTorch is not installed" in m and "skipped" in m for m in messages), messages
assert "torch" not in sys.modules, "the self-test imported torch"
print("self-test without torch:", messages[-1])
print("ALL CHECKS PASSED")
