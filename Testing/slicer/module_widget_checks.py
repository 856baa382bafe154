"""Run by test_module_load.py through ``slicer_app.py --no-torch``: the panel's own logic (the widget
class of MorphSeek.py built on Slicer's real ScriptedLoadableModuleWidget, Slicer's real parameter
node wrapper and its connectGui) with the .ui's widgets replaced by plain stand-ins that keep the
properties the widget sets. Checks the review's findings: Register is not clickable while a
fine-tuning runs; an update whose display fails does not drop the rest of the poll batch (the
final one gives the buttons back); the step candidates and the training chart are let go on
scene close; a saved device that is not detected is shown as such and kept."""

import logging
import tempfile
from types import SimpleNamespace

import slicer_app

slicer = slicer_app.install(tempfile.mkdtemp(prefix="morphseek-app-"))
module = slicer_app.load_module_file()
from MorphSeekLib.runs import RunUpdate  # noqa: E402


class StandIn:
    """A .ui widget: the attributes the widget code sets, a combo box's items, a table's node."""

    def __init__(self):
        self.enabled, self.text, self.value, self.currentPath = True, "", 0, ""
        self.items, self.currentIndex, self.tableNode = [], -1, "unset"

    def property(self, name):  # parameterNodeWrapper.connectGui looks for SlicerParameterName
        return None

    def connect(self, signal, slot):
        pass

    def blockSignals(self, block):
        return False

    def clear(self):
        self.items = []

    def addItem(self, label, data):
        self.items.append((label, data))

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)

    def itemData(self, index):
        return self.items[index][1]

    def setCurrentIndex(self, index):
        self.currentIndex = index

    def setMRMLTableNode(self, node):
        self.tableNode = node


class FakeRun:
    """What the widget reads of a runs.RegistrationRun / FinetuneRun."""

    def __init__(self, updates):
        self.updates, self.running, self.chart = updates, True, None

    def poll(self):
        updates, self.updates, self.running = self.updates, [], False
        return updates


names = ("registerButton", "finetuneButton", "saveButton", "progressBar", "finetuneProgressBar", "statusLabel",
         "finetuneStatusLabel", "deviceComboBox", "modelPathLineEdit", "datasetPathLineEdit",
         "checkpointOutPathLineEdit", "candidatesTableView", "metricsTableView", "stepSliderWidget",
         "stepTitleLabel")
widget = module.MorphSeekWidget(parent=slicer_app._Placeholder())
widget.ui = SimpleNamespace(**{name: StandIn() for name in names})
widget.logic = module.MorphSeekLogic()
parameters = widget.logic.getParameterNode()
parameters.device = "cuda:1"  # saved on another computer
widget.setParameterNode(parameters)  # Slicer's own connectGui on the stand-ins
ui = widget.ui

# A saved device that is not detected stays the choice and says so.
assert ui.deviceComboBox.items[-1] == ("cuda:1 (not checked yet)", "cuda:1"), ui.deviceComboBox.items
assert ui.deviceComboBox.currentIndex == 2 and parameters.device == "cuda:1"
widget._detectedDevices = [{"key": "cuda:0", "label": "GPU 0"}]
widget._fillDevices()
assert ui.deviceComboBox.items[-1] == ("cuda:1 (not detected)", "cuda:1") and parameters.device == "cuda:1"

# Register needs two volumes and is not clickable while a fine-tuning runs.
parameters.fixedVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
parameters.movingVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
widget._updateButtons()
assert ui.registerButton.enabled and ui.registerButton.text == "Register" and ui.finetuneButton.enabled
widget._run, widget._runKind = FakeRun([]), "finetune"
widget._updateButtons()
assert not ui.registerButton.enabled, "Register is clickable during a fine-tuning"
assert ui.finetuneButton.enabled and ui.finetuneButton.text == "Cancel"
widget._runKind = "register"
widget._updateButtons()
assert ui.registerButton.enabled and ui.registerButton.text == "Cancel" and not ui.finetuneButton.enabled

# Register passes the panel's settings to the logic's request: test-time optimisation as an int.
from MorphSeekLib.logic import SceneLogic  # noqa: E402
from morphseek.errors import MorphSeekError  # noqa: E402

requested, shown = [], []


def prepare(self, *args, **kwargs):
    requested.append(kwargs)
    raise MorphSeekError("stopped after the request (no worker in this check)")


original_prepare, SceneLogic.prepare = SceneLogic.prepare, prepare
widget._ensureDependencies, widget._showError = (lambda: True), shown.append
widget._run, widget._runKind = None, None
try:
    for iterations, smoothness, fine, box in ((30, 1.5, True, True), (0, 4.0, False, False)):
        parameters.adaptIterations, parameters.adaptLambda, parameters.fineLastStep = iterations, smoothness, fine
        parameters.contentBox = box
        widget.onRegisterOrCancel()
finally:
    SceneLogic.prepare = original_prepare
assert [r["adapt"] for r in requested] == [30, 0] and all(type(r["adapt"]) is int for r in requested)  # noqa: E721
assert [r["adapt_lambda"] for r in requested] == [1.5, 4.0]
assert [r["fine_steps"] for r in requested] == [None, 0]  # the checkbox: the engine's choice, or none
assert [r["crop"] for r in requested] == [True, False]  # the content-box checkbox reaches the request
assert requested[0]["steps"] == 3 and requested[0]["prealign"] == "affine" and len(shown) == 2
assert widget._run is None and ui.registerButton.enabled

# Fine-tune runs GRPO at its own temperature, not at the candidates' temperature of Register.
finetune_requests = []


def recording_run(*args, **kwargs):
    finetune_requests.append(kwargs)
    raise MorphSeekError("stopped after the request (no worker in this check)")


original_run, module.FinetuneRun = module.FinetuneRun, recording_run
widget._launch = lambda: None  # (no PythonSlicer here)
parameters.finetuneFromScene, parameters.datasetPath, parameters.temperature = False, "/tmp/cases", 0.3
parameters.checkpointOut = "/tmp/tuned.pt"
try:
    widget.onFinetuneOrCancel()
finally:
    module.FinetuneRun = original_run
    del widget._launch
assert len(finetune_requests) == 1 and "tau" not in finetune_requests[0], (finetune_requests, shown)  # runs.FinetuneRun's default
assert widget._run is None and len(shown) == 3

# One update whose display fails (a progress row without payload) must not drop the final update.
parameters.checkpointOut = "/tmp/tuned.pt"
widget._run = FakeRun([RunUpdate("progress", "grpo 1/2", 0.5, "grpo", None),
                       RunUpdate("finished", "fine-tuning finished", 1.0, "done", {"validation": {"val_dice": 81.5}})])
widget._runKind = "finetune"
logged = []
handler = logging.Handler()
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger().addHandler(handler)
widget.onPoll()
logging.getLogger().removeHandler(handler)
assert "MorphSeek: showing a run update failed" in logged, logged  # the first update's display failed
assert widget._run is None
assert ui.finetuneButton.text == "Fine-tune" and ui.finetuneButton.enabled and ui.registerButton.enabled
assert ui.finetuneStatusLabel.text.startswith("Fine-tuned checkpoint written: /tmp/tuned.pt"), ui.finetuneStatusLabel.text
assert "81.5" in ui.finetuneStatusLabel.text and parameters.modelPath == "/tmp/tuned.pt"

# A fine-tuning that lowered held-back Dice: both figures shown, the model in use left as it was.
parameters.modelPath, parameters.checkpointOut = "/tmp/start.pt", "/tmp/tuned-worse.pt"
widget._run = FakeRun([RunUpdate("finished", "fine-tuning finished", 1.0, "done",
                                 {"validation": {"val_dice": 70.6}, "validation_start": {"val_dice": 71.8},
                                  "held_back_fell": True})])
widget._runKind = "finetune"
widget.onPoll()
text = ui.finetuneStatusLabel.text
assert "71.8 % -> 70.6 %" in text and "model in use is unchanged" in text and "/tmp/tuned-worse.pt" in text, text
assert parameters.modelPath == "/tmp/start.pt"
# ... and one that raised it: both figures, the fine-tuned model in use
parameters.checkpointOut = "/tmp/tuned-better.pt"
widget._run = FakeRun([RunUpdate("finished", "fine-tuning finished", 1.0, "done",
                                 {"validation": {"val_dice": 72.4}, "validation_start": {"val_dice": 71.8},
                                  "held_back_fell": False})])
widget._runKind = "finetune"
widget.onPoll()
assert "71.8 % -> 72.4 %" in ui.finetuneStatusLabel.text and parameters.modelPath == "/tmp/tuned-better.pt"

# Scene close: the nodes of the closing scene are let go.
widget._stepCandidates, widget._trainingChart = object(), object()
widget.onSceneStartClose(None, None)
assert widget._stepCandidates is None and widget._trainingChart is None and widget._parameterNode is None
assert ui.candidatesTableView.tableNode is None and ui.metricsTableView.tableNode is None
print("WIDGET CHECKS PASSED")
