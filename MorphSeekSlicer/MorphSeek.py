"""MorphSeek: deformable 3D registration with step-wise refinement and a browsable step preview.

Module, widget (binds Resources/UI/MorphSeek.ui to a parameter node and runs the logic off the GUI
thread), logic (the Qt-free ``MorphSeekLib.logic.MorphSeekLogic`` on Slicer's scene) and self-test.
"""

from __future__ import annotations

import logging
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLGridTransformNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from MorphSeekLib import dependencies

dependencies.add_source_engine_to_path()  # a source checkout: MorphSeekCore/ next to this folder

from MorphSeekLib import logic as registration  # noqa: E402
from MorphSeekLib import preview  # noqa: E402
from MorphSeekLib import training  # noqa: E402
from MorphSeekLib.jobs import BackgroundJob, EventKind  # noqa: E402

POLL_MS = 100


class MorphSeek(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MorphSeek")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["MorphSeek contributors"]
        self.parent.helpText = _(
            "Deformable registration of 3D volumes (and their segmentations) with a MorphSeek model: "
            "T refinement steps, optional candidate search per step, a step-by-step preview with the "
            "Jacobian determinant and folded voxels, and GRPO fine-tuning on a few labelled cases. "
            "See docs/SLICER-MODULE.md in the project repository."
        )
        self.parent.acknowledgementText = _("MorphSeek (arXiv 2511.17392) implemented as an open Slicer extension.")


@parameterNodeWrapper
class MorphSeekParameterNode:
    """The panel's state (saved with the scene)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    device: str = "auto"
    steps: Annotated[float, WithinRange(1, 10)] = 3
    candidates: Annotated[float, WithinRange(1, 16)] = 1
    temperature: Annotated[float, WithinRange(0, 1)] = 0.3
    prealign: bool = True
    outputTransform: vtkMRMLGridTransformNode
    finetuneFromScene: bool = True
    datasetPath: str = ""
    warmupIterations: Annotated[float, WithinRange(0, 2000)] = 0
    episodes: Annotated[float, WithinRange(1, 500)] = 20
    checkpointOut: str = ""


class MorphSeekWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobKind = None  # "register" | "finetune"
        self._request = None
        self._outputs = None
        self._stepCandidates = None
        self._trainingHistory = []
        self._trainingChart = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MorphSeek.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MorphSeekLogic()

        self.ui.deviceComboBox.clear()
        for choice in registration.available_devices():
            self.ui.deviceComboBox.addItem(choice.label, choice.key)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterOrCancel)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneOrCancel)
        self.ui.saveButton.connect("clicked(bool)", self.onSave)
        self.ui.stepSliderWidget.connect("valueChanged(double)", self.onStepChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", lambda p: self._setText("modelPath", p))
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", lambda p: self._setText("datasetPath", p))
        self.ui.checkpointOutPathLineEdit.connect("currentPathChanged(QString)",
                                                  lambda p: self._setText("checkpointOut", p))
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel_job()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel_job()
        self._outputs = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.modelPath
            self.ui.datasetPathLineEdit.currentPath = self._parameterNode.datasetPath
            self.ui.checkpointOutPathLineEdit.currentPath = self._parameterNode.checkpointOut
            index = self.ui.deviceComboBox.findData(self._parameterNode.device)
            self.ui.deviceComboBox.setCurrentIndex(max(index, 0))
            self._updateButtons()

    def _setText(self, name: str, value: str) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, name, value)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._job is not None
        p = self._parameterNode
        ready = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        self.ui.registerButton.enabled = ready or (running and self._jobKind == "register")
        self.ui.registerButton.text = _("Cancel") if running and self._jobKind == "register" else _("Register")
        self.ui.finetuneButton.enabled = not running or self._jobKind == "finetune"
        self.ui.finetuneButton.text = _("Cancel") if running and self._jobKind == "finetune" else _("Fine-tune")
        self.ui.saveButton.enabled = self._outputs is not None and not running

    # -- dependencies -----------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        """Offer to install what is missing (torch first); never silently, never at import."""
        missing = dependencies.missing()
        if not missing:
            return True
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
        except ImportError:
            PyTorchUtils = None
        how = _("through the PyTorch extension") if PyTorchUtils is not None else _("with pip")
        if not slicer.util.confirmOkCancelDisplay(
            _("MorphSeek needs {names}, which are not installed. Install them now {how}? "
              "This can take several minutes.").format(names=", ".join(missing), how=how)):
            return False
        try:
            with slicer.util.WaitCursor():
                dependencies.install(missing, slicer.util.pip_install, PyTorchUtils)
        except Exception as error:  # pip or PyTorchUtils failures: show them, do not start the job
            slicer.util.errorDisplay(_("Installing {names} failed.").format(names=", ".join(missing)),
                                     detailedText=str(error))
            return False
        self.ui.deviceComboBox.clear()
        for choice in registration.available_devices():
            self.ui.deviceComboBox.addItem(choice.label, choice.key)
        return not dependencies.missing()

    # -- registration -----------------------------------------------------------------------------
    def onRegisterOrCancel(self) -> None:
        if self._job is not None and self._jobKind == "register":
            self._job.cancel_job()
            self.ui.statusLabel.text = _("Cancelling after the current step...")
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        try:
            self._request = self.logic.prepare(
                p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation,
                model=p.modelPath or None, steps=int(p.steps), trajectories=int(p.candidates),
                tau=float(p.temperature), device=p.device, prealign="affine" if p.prealign else "none")
        except Exception as error:  # MorphSeekError: bad input, missing model; nothing was created
            self._showError(error)
            return
        request = self._request
        self._startJob("register", lambda progress, cancel: self.logic.compute(request, progress, cancel))

    def _startJob(self, kind: str, work) -> None:
        self._jobKind = kind
        self._job = BackgroundJob(work, name=f"MorphSeek {kind}").start()
        bar = self.ui.progressBar if kind == "register" else self.ui.finetuneProgressBar
        bar.value = 0
        self._timer.start()
        self._updateButtons()

    def onPoll(self) -> None:
        if self._job is None:
            self._timer.stop()
            return
        for event in self._job.poll():
            if event.kind is EventKind.PROGRESS:
                if self._jobKind == "register":
                    self._showRegistrationProgress(event.payload)
                else:
                    self._showTrainingProgress(event.payload)
            elif event.kind is EventKind.FINISHED:
                self._finishJob()
                self._onFinished(event.payload)
            elif event.kind is EventKind.CANCELLED:
                self._finishJob()
                self._status(_("Cancelled: the scene is as it was."))
            elif event.kind is EventKind.FAILED:
                self._finishJob()
                logging.error(event.details)
                self._showError(event.payload)

    def _finishJob(self) -> None:
        """The job has ended (``_jobKind`` stays set for the messages that follow)."""
        self._timer.stop()
        self._job = None
        self._updateButtons()

    def _status(self, text: str) -> None:
        label = self.ui.statusLabel if self._jobKind == "register" else self.ui.finetuneStatusLabel
        label.text = text

    def _showError(self, error) -> None:
        self._status(_("Error: {error}").format(error=error))
        slicer.util.errorDisplay(str(error))

    def _showRegistrationProgress(self, event) -> None:
        self.ui.progressBar.value = int(round(100 * event.fraction))
        self.ui.statusLabel.text = event.message
        if event.record is not None and len(event.record.candidates) > 1:
            rewards = ", ".join(f"{c.reward:+.3f}" for c in event.record.candidates)
            self.ui.statusLabel.text = f"{event.message}\n{_('rewards')}: {rewards}"

    def _onFinished(self, result) -> None:
        if self._jobKind == "finetune":
            validation = getattr(result, "validation", None) or {}
            heldBack = (_(", held-back Dice {dice:.1f} %").format(dice=validation["val_dice"])
                        if "val_dice" in validation else "")
            self._status(_("Fine-tuned checkpoint written: {path}{heldBack}").format(
                path=self._parameterNode.checkpointOut, heldBack=heldBack))
            self._parameterNode.modelPath = self._parameterNode.checkpointOut
            self.ui.modelPathLineEdit.currentPath = self._parameterNode.checkpointOut
            return
        try:
            self._outputs = self.logic.create_nodes(self._request, result)
        except Exception as error:
            self._showError(error)
            return
        self._parameterNode.outputTransform = self._outputs.transform
        steps = self._outputs.preview.number_of_steps
        self.ui.stepSliderWidget.maximum = steps
        self.ui.stepSliderWidget.enabled = steps > 1
        self.ui.metricsTableView.setMRMLTableNode(self._outputs.metrics_table)
        self._showPreviewInViews()
        self.ui.stepSliderWidget.value = steps
        self.onStepChanged(steps)
        final = result.steps[-1]
        dice = f", Dice {final.dice:.1f} %" if final.dice is not None else ""
        self._status(_("Done{dice}, folded voxels {njd:.3f} %. The transform can be applied to any node "
                       "(Transforms module) and hardened.").format(dice=dice, njd=final.njd_percent))
        self._updateButtons()

    def _showPreviewInViews(self) -> None:
        """Red: fixed + warped (50 %) + segment outlines + folded voxels; Yellow: the Jacobian
        determinant (blue < 1 < red) with folded voxels outlined; Green: as Red, coronal."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        overlay, jacobian = preview.preview_layers(self._parameterNode.fixedVolume.GetID(), self._outputs.preview)
        for viewName, layers, orientation in (("Red", overlay, "Axial"), ("Yellow", jacobian, "Axial"),
                                              ("Green", overlay, "Coronal")):
            widget = layoutManager.sliceWidget(viewName)
            if widget is None:
                continue
            sliceLogic = widget.sliceLogic()
            preview.apply_layers(sliceLogic.GetSliceCompositeNode(), sliceLogic.GetSliceNode(), layers)
            sliceLogic.GetSliceNode().SetOrientation(orientation)
            sliceLogic.FitSliceToAll()
        # Only the preview's segmentation is drawn: the others would hide its outlines.
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if node is not self._outputs.preview.proxies.get("segmentation") and node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility2D(False)

    def onStepChanged(self, value: float) -> None:
        if self._outputs is None:
            return
        step = int(round(value))
        preview.select_step(slicer.mrmlScene, self._outputs.preview, step)
        self._stepCandidates = preview.candidates_table(
            slicer.mrmlScene, self._outputs.result.steps, f"{self._request.output_name} candidates of the step",
            only_step=step, node=self._stepCandidates)
        self.ui.candidatesTableView.setMRMLTableNode(self._stepCandidates)

    def onSave(self) -> None:
        if self._outputs is None:
            return
        folder = self.ui.saveDirectoryButton.directory
        with slicer.util.tryWithErrorDisplay(_("Saving failed."), waitCursor=True):
            written = self.logic.save_outputs(self._outputs, folder)
            self.ui.statusLabel.text = _("Saved {n} files to {folder}").format(n=len(written), folder=folder)

    # -- fine-tuning --------------------------------------------------------------------------------
    def onFinetuneOrCancel(self) -> None:
        if self._job is not None and self._jobKind == "finetune":
            self._job.cancel_job()
            self.ui.finetuneStatusLabel.text = _("Stopping after the current step...")
            return
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        model, out = p.modelPath or None, p.checkpointOut
        options = dict(warmupIterations=int(p.warmupIterations), episodes=int(p.episodes), steps=int(p.steps),
                       trajectories=max(2, int(p.candidates)), tau=float(p.temperature), device=p.device)
        self._jobKind = "finetune"  # errors below go to the fine-tune status line
        exported = None
        if p.finetuneFromScene:
            # Scene cases are exported here, on the main thread; the job only reads the files.
            try:
                if not out:
                    raise registration.MorphSeekError(_("choose where to save the fine-tuned checkpoint"))
                cases = training.cases_from_segmentations(self.ui.finetuneSegmentationsComboBox.checkedNodes())
                with slicer.util.WaitCursor():
                    exported = self.logic.export_cases(cases)
            except Exception as error:  # MorphSeekError: too few cases, no shared segment, a 2D volume...
                self._showError(error)
                return
            dataset = exported.manifest
            self.ui.finetuneStatusLabel.text = _("{n} cases: {train} training pairs, {val} held-back pairs").format(
                n=len(exported.subjects), train=len(exported.train_pairs), val=len(exported.val_pairs))
        else:
            dataset = p.datasetPath

        def work(progress, cancel):
            try:
                return self.logic.finetune(dataset, model, out, progress=progress, cancel=cancel, **options)
            finally:
                if exported is not None:
                    exported.cleanup()  # the temporary dataset, also on error or cancel

        self._trainingHistory = []
        self._startJob("finetune", work)

    def _showTrainingProgress(self, row: dict) -> None:
        total = max(int(row.get("total", 1)), 1)
        self.ui.finetuneProgressBar.value = int(100 * int(row.get("done", 0)) / total)
        stage = row.get("stage", "")
        self.ui.finetuneStatusLabel.text = f"{stage} {row.get('done', 0)}/{total}"
        if stage == "grpo":
            self._trainingHistory.append(row)
            created = self._trainingChart is None
            self._trainingChart = preview.training_plot(slicer.mrmlScene, self._trainingHistory,
                                                        chart=self._trainingChart)
            if created:
                slicer.modules.plots.logic().ShowChartInLayout(self._trainingChart)


class MorphSeekLogic(ScriptedLoadableModuleLogic, registration.MorphSeekLogic):
    """Slicer's module logic: the parameter node plus the Qt-free registration logic on Slicer's scene."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        registration.MorphSeekLogic.__init__(self, scene if scene is not None else slicer.mrmlScene)

    def getParameterNode(self):
        return MorphSeekParameterNode(super().getParameterNode())


class MorphSeekTest(ScriptedLoadableModuleTest):
    """The scenario of the pytest suite (Testing/slicer), run inside Slicer."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_registration_scenario()

    def test_registration_scenario(self) -> None:
        from MorphSeekLib import selftest

        scenario = selftest.scenario(slicer.mrmlScene, slicer.app.temporaryPath)
        self.delayDisplay(scenario.description)
        nodes = scenario.nodes
        before = slicer.mrmlScene.GetNumberOfNodes()
        logic = MorphSeekLogic()
        try:
            logic.register(nodes["fixed"], nodes["moving"], model=scenario.model, steps=2, device="cpu",
                           cancel=lambda: True)
            raise AssertionError("cancel was ignored")
        except registration.MorphSeekError:
            pass
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before, "cancel left nodes behind")
        self.delayDisplay("Registering")
        outputs = scenario.register(logic, device="cpu")
        self.assertEqual(scenario.check(slicer.mrmlScene, outputs), [])
        self.delayDisplay("Test passed")
