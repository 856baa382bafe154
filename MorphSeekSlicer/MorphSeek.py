"""MorphSeek: deformable 3D registration with step-wise refinement and a browsable step preview.

Module, widget (binds Resources/UI/MorphSeek.ui to a parameter node; registration and fine-tuning
run in a worker process, polled by a timer), module logic (the parameter node; the work is done by
the Qt-free ``MorphSeekLib.logic.SceneLogic``) and self-test.

Nothing imported here imports torch: the module loads before PyTorch is installed, and the panel
offers to install it when it is first needed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
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
from slicer.i18n import translate
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

from morphseek import defaults  # noqa: E402
from morphseek.errors import MorphSeekError  # noqa: E402
from MorphSeekLib import preview, training  # noqa: E402
from MorphSeekLib.logic import SceneLogic, device_choices  # noqa: E402
from MorphSeekLib.runs import DeviceProbe, FinetuneRun, RegistrationRun, WorkerLaunch  # noqa: E402

POLL_MS = 100
SAMPLE_CATEGORY = "MorphSeek"
ADAPT_DEFAULT = defaults.ADAPT  # test-time optimisation iterations, as `morphseek demo` (docs/QUALITY.md)
ADAPT_LAMBDA_DEFAULT = defaults.ADAPT_LAMBDA  # its regulariser weight, as `morphseek register --adapt-lambda`


class MorphSeek(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MorphSeek")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["MorphSeek contributors"]
        self.parent.helpText = _(
            "Deformable registration of 3D volumes (and their segmentations) with a MorphSeek model: "
            "T refinement steps by the network, optional candidate search per step, then optional "
            "test-time optimisation of the result on this pair (one more step; 30 iterations by default, "
            "0 = off), a step-by-step preview with the Jacobian determinant and folded voxels, and GRPO "
            "fine-tuning on a few labelled cases. See docs/SLICER-MODULE.md in the project repository."
        )
        self.parent.acknowledgementText = _("MorphSeek (arXiv 2511.17392) implemented as an open Slicer extension.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData() -> bool:
    """The shipped sample pair (two held-back brains of the brain sample, fixed and moving volume with
    their segmentations; what the brain model registers in ``morphseek demo``) in the Sample Data
    module, loaded from the extension's own files. False when the Sample Data module or the files
    are absent (a minimal Slicer build, a checkout without Resources/SampleData)."""
    try:
        import SampleData
    except ImportError:
        logging.info("MorphSeek: the Sample Data module is not available; the sample pair is not registered")
        return False
    from MorphSeekLib import selftest

    folder = selftest.sample_data_folder()
    if folder is None:
        return False
    order = ("fixed", "moving", "fixed_seg", "moving_seg")
    files = [folder / selftest.SAMPLE_FILES[key] for key in order]
    types = ["VolumeFile", "VolumeFile", "SegmentationFile", "SegmentationFile"]
    icon = Path(__file__).resolve().parent / "Resources" / "Icons" / "MorphSeek.png"
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY, sampleName="MorphSeekBrainPair", thumbnailFileName=str(icon),
        # the file names Sample Data caches them under: the brain sample's own (10_t1.nii.gz...) are too plain
        uris=[path.as_uri() for path in files], fileNames=[f"MorphSeek-brain-{path.name}" for path in files],
        nodeNames=["MorphSeek fixed brain 10", "MorphSeek moving brain 09", "MorphSeek fixed brain 10 seg",
                   "MorphSeek moving brain 09 seg"],
        loadFileType=types)
    return True


def workerLaunch() -> WorkerLaunch:
    """How the panel starts the worker: Slicer's own Python, PythonSlicer (inside the application
    ``sys.executable`` is Slicer itself), in Slicer's start-up environment, as SlicerMONAIAuto3DSeg
    starts its inference process; temporary files under Slicer's temporary folder."""
    python = shutil.which("PythonSlicer")
    if python is None:
        raise MorphSeekError("PythonSlicer (Slicer's Python) was not found on the PATH of this Slicer: "
                             "the MorphSeek worker cannot be started")
    return WorkerLaunch(python=python, env=slicer.util.startupEnvironment(),
                        temporary_folder=slicer.app.temporaryPath)


@parameterNodeWrapper
class MorphSeekParameterNode:
    """The panel's state (saved with the scene)."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedSegmentation: vtkMRMLSegmentationNode
    movingSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    device: str = "auto"
    steps: Annotated[int, WithinRange(1, 10)] = 3
    #: the last step on the fine grid (the engine's choice for the model, ``fine_steps=None``); off: 0
    fineLastStep: bool = True
    #: each step's network sees only the box around the volumes' content (``register_images(crop=True)``)
    contentBox: bool = defaults.CROP
    trajectories: Annotated[int, WithinRange(1, 16)] = 1  # J, candidates per step (METHOD.md)
    temperature: Annotated[float, WithinRange(0, 1)] = 0.3
    prealign: bool = True
    #: test-time optimisation after the network's steps (one more step; 0: off). The default is the
    #: demo's (``morphseek demo --adapt 30``): the shipped brain model gains most of its Dice with it.
    adaptIterations: Annotated[int, WithinRange(0, 500)] = ADAPT_DEFAULT
    #: its smoothness (regulariser weight): higher gives a smoother map for some Dice
    adaptLambda: Annotated[float, WithinRange(0, 10)] = ADAPT_LAMBDA_DEFAULT
    outputTransform: vtkMRMLGridTransformNode
    finetuneFromScene: bool = True
    datasetPath: str = ""
    warmupIterations: Annotated[int, WithinRange(0, 2000)] = 0
    episodes: Annotated[int, WithinRange(1, 500)] = 20
    checkpointOut: str = ""


class MorphSeekWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # a runs.RegistrationRun or runs.FinetuneRun while one is running
        self._runKind = None  # "register" | "finetune": also routes the messages after the run ended
        self._outputs = None
        self._viewState = None  # the slice views before the live preview took them over
        self._fixedVolumeId = None  # the fixed volume of the last registration run
        self._stepCandidates = None
        self._trainingChart = None
        self._deviceProbe = None
        self._detectedDevices = None  # None until the worker has said which devices torch sees
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
        """Module reload or application exit: no worker may outlive the panel."""
        if self._run is not None and self._run.running:
            self._run.cancel()
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
        self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._probeDevices()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None and self._run.running:
            self._run.cancel()
            self._endRun()
        self._outputs = None
        self._viewState = None
        # Nodes of the closing scene: the next run starts new ones.
        self._stepCandidates = None
        self._trainingChart = None
        self.ui.candidatesTableView.setMRMLTableNode(None)
        self.ui.metricsTableView.setMRMLTableNode(None)
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
            self._fillDevices()
            self._updateButtons()

    def _setText(self, name: str, value: str) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, name, value)

    # -- devices ----------------------------------------------------------------------------------
    def _fillDevices(self) -> None:
        """Auto, CPU, the detected devices and the saved choice even when it is not detected (it is
        shown as such instead of silently becoming Auto)."""
        saved = self._parameterNode.device if self._parameterNode else "auto"
        combo = self.ui.deviceComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            for choice in device_choices(self._detectedDevices, saved):
                combo.addItem(choice.label, choice.key)
            combo.setCurrentIndex(max(combo.findData(saved), 0))
        finally:
            combo.blockSignals(wasBlocked)

    def _probeDevices(self) -> None:
        """Ask a worker which devices torch sees (once, when torch is installed): CUDA is never
        initialised in Slicer's process or on the GUI thread."""
        if self._deviceProbe is not None or dependencies.missing():
            return
        try:
            self._deviceProbe = DeviceProbe(self._launch()).start()
        except Exception as error:  # noqa: BLE001 - the selector then offers Auto and CPU only
            logging.warning(f"MorphSeek: the device probe could not start: {error}")
            return
        self._timer.start()

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def _updateButtons(self, caller=None, event=None) -> None:
        running = self._run is not None
        p = self._parameterNode
        ready = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        registering, finetuning = running and self._runKind == "register", running and self._runKind == "finetune"
        self.ui.registerButton.enabled = (ready and not running) or registering
        self.ui.registerButton.text = _("Cancel") if registering else _("Register")
        self.ui.finetuneButton.enabled = not running or finetuning
        self.ui.finetuneButton.text = _("Cancel") if finetuning else _("Fine-tune")
        self.ui.saveButton.enabled = self._outputs is not None and not running

    # -- dependencies -----------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        """Offer to install PyTorch (and safetensors, tqdm) when missing; never silently, never at import."""
        missing = dependencies.missing()
        if not missing:
            return True
        try:
            import PyTorchUtils  # the PyTorch extension (EXTENSION_DEPENDS)
        except ImportError:
            PyTorchUtils = None
        how = _("through the PyTorch extension") if PyTorchUtils is not None else _("with pip")
        if not slicer.util.confirmOkCancelDisplay(
            _("MorphSeek needs these Python packages, which are not installed: {names}. Install them now "
              "(PyTorch {how}, the others with pip)? This can take several minutes.").format(
                names=", ".join(missing), how=how)):
            return False
        try:
            with slicer.util.WaitCursor():
                dependencies.install(missing, slicer.util.pip_install, PyTorchUtils)
        except Exception as error:  # pip or PyTorchUtils failures: show them, do not start the job
            slicer.util.errorDisplay(_("Installing {names} failed.").format(names=", ".join(missing)),
                                     detailedText=str(error))
            return False
        self._probeDevices()
        return not dependencies.missing()

    def _launch(self) -> WorkerLaunch:
        return workerLaunch()

    # -- running ----------------------------------------------------------------------------------
    def _startRun(self, kind: str, run) -> None:
        self._runKind = kind
        self._run = run
        bar = self.ui.progressBar if kind == "register" else self.ui.finetuneProgressBar
        bar.value = 0
        self._timer.start()
        self._updateButtons()

    def _endRun(self) -> None:
        """The run has ended (``_runKind`` stays set for the messages that follow)."""
        self._run = None
        if self._deviceProbe is None or self._deviceProbe.finished:
            self._timer.stop()
        self._updateButtons()

    def onPoll(self) -> None:
        if self._deviceProbe is not None and not self._deviceProbe.finished:
            if self._deviceProbe.poll() is not None:
                self._detectedDevices = self._deviceProbe.devices
                if self._deviceProbe.error:
                    logging.warning(f"MorphSeek device probe: {self._deviceProbe.error}")
                self._fillDevices()
        if self._run is None:
            if self._deviceProbe is None or self._deviceProbe.finished:
                self._timer.stop()
            return
        run = self._run
        for update in run.poll():
            # Each update on its own: one failing handler must not drop the rest (the final one
            # above all, which gives the buttons back).
            try:
                self._onUpdate(update)
            except Exception as error:  # noqa: BLE001
                logging.exception("MorphSeek: showing a run update failed")
                self._status(_("Error while showing the result: {error}").format(error=error))
        if not run.running and self._run is run:
            self._endRun()

    def _onUpdate(self, update) -> None:
        if update.kind == "log":
            logging.info(f"MorphSeek worker: {update.message}")
        elif update.kind == "progress":
            if self._runKind == "register":
                self.ui.progressBar.value = int(round(100 * (update.fraction or 0.0)))
                self.ui.statusLabel.text = update.message
            else:
                self._showTrainingProgress(update)
        elif update.kind == "step":
            self._showStep(update)
        elif update.kind == "finished":
            self._endRun()
            self._onFinished(update.payload)
        elif update.kind == "failed":
            self._endRun()
            self._restoreViews()
            if update.details:
                logging.error(f"MorphSeek worker failed: {update.message}\n{update.details}")
            self._showError(update.message)
        elif update.kind == "cancelled":
            self._endRun()
            self._restoreViews()
            self._status(update.message)

    def _status(self, text: str) -> None:
        label = self.ui.statusLabel if self._runKind == "register" else self.ui.finetuneStatusLabel
        label.text = text

    def _showError(self, error) -> None:
        self._status(_("Error: {error}").format(error=error))
        slicer.util.errorDisplay(str(error))

    # -- registration -----------------------------------------------------------------------------
    def onRegisterOrCancel(self) -> None:
        if self._run is not None and self._runKind == "register":
            self._onUpdate(self._run.cancel())
            return
        if self._run is not None or not self._ensureDependencies():
            return
        p = self._parameterNode
        self._runKind = "register"
        try:
            request = self.logic.sceneLogic.prepare(
                p.fixedVolume, p.movingVolume, p.fixedSegmentation, p.movingSegmentation,
                model=p.modelPath or None, steps=p.steps, trajectories=p.trajectories,
                tau=float(p.temperature), device=p.device, prealign="affine" if p.prealign else "none",
                adapt=p.adaptIterations, adapt_lambda=float(p.adaptLambda),
                fine_steps=None if p.fineLastStep else 0, crop=p.contentBox)
            with slicer.util.WaitCursor():
                run = RegistrationRun(self.logic.sceneLogic, request, self._launch()).start()
        except Exception as error:  # MorphSeekError: bad input, missing model; nothing was created
            self._showError(error)
            return
        self._outputs = None
        self._viewState = None
        self._fixedVolumeId = request.fixed_volume_id  # the views' background, whatever the selector says later
        self.ui.stepSliderWidget.enabled = False
        self.ui.stepTitleLabel.text = ""
        self._startRun("register", run)

    def _showStep(self, update) -> None:
        """A step arrived: it is in the preview sequences already; show it (live)."""
        self.ui.progressBar.value = int(round(100 * (update.fraction or 0.0)))
        step = update.payload
        text = update.message
        if len(step.candidates) > 1:
            text += "\n" + _("rewards") + ": " + ", ".join(f"{c.reward:+.3f}" for c in step.candidates)
        self.ui.statusLabel.text = text
        run = self._run
        if run is None or run.preview is None:
            return
        self.ui.stepTitleLabel.text = preview.step_title(step, run.request.total_steps)
        # Everything shown here is made inside the run's tracker: Cancel removes it with the preview.
        with run.tracker.recording():
            if self._viewState is None:
                self._viewState = self._snapshotViews()
                self._showPreviewInViews(run.preview)
            self._showCandidates(run.steps, step.index, run.request.output_name)

    def _snapshotViews(self):
        layoutManager = slicer.app.layoutManager()
        sliceLogics = [layoutManager.sliceWidget(name).sliceLogic() for name in ("Red", "Yellow", "Green")
                       if layoutManager.sliceWidget(name) is not None]
        return layoutManager.layout, preview.snapshot_views(slicer.mrmlScene, sliceLogics)

    def _restoreViews(self) -> None:
        """A cancelled or failed run: the views show what they showed before it."""
        if self._viewState is None:
            return
        layout, snapshot = self._viewState
        self._viewState = None
        snapshot.restore()
        slicer.app.layoutManager().setLayout(layout)

    def _onFinished(self, result) -> None:
        if self._runKind == "finetune":
            result = result or {}
            after = (result.get("validation") or {}).get("val_dice")
            before = (result.get("validation_start") or {}).get("val_dice")
            heldBack = ""
            if after is not None:
                heldBack = (_(", held-back Dice {before:.1f} % -> {after:.1f} %").format(before=before, after=after)
                            if before is not None else _(", held-back Dice {dice:.1f} %").format(dice=after))
            path = self._parameterNode.checkpointOut
            if result.get("held_back_fell"):
                # the model it started from registers the held-back cases better: keep it in use
                self._status(_("Fine-tuned checkpoint written: {path}{heldBack}. Fine-tuning lowered "
                               "held-back Dice, so the model in use is unchanged; choose the checkpoint "
                               "yourself if these cases do not represent yours.").format(path=path, heldBack=heldBack))
                return
            self._status(_("Fine-tuned checkpoint written: {path}{heldBack}").format(path=path, heldBack=heldBack))
            self._parameterNode.modelPath = path
            self.ui.modelPathLineEdit.currentPath = path
            return
        self._outputs = result
        self._viewState = None  # the preview stays in the views: it is the result
        self._parameterNode.outputTransform = result.transform
        steps = result.preview.number_of_steps
        self.ui.stepSliderWidget.maximum = steps
        self.ui.stepSliderWidget.enabled = steps > 1
        self.ui.metricsTableView.setMRMLTableNode(result.metrics_table)
        self._showPreviewInViews(result.preview)
        self.ui.stepSliderWidget.value = steps
        self.onStepChanged(steps)
        final = result.result.steps[-1]
        dice = f", Dice {final.dice:.1f} %" if final.dice is not None else ""
        self._status(_("Done{dice}, folded voxels {njd:.3f} %. The transform can be applied to any node "
                       "(Transforms module) and hardened.").format(dice=dice, njd=final.njd_percent))
        self._updateButtons()

    def _showPreviewInViews(self, stepPreview) -> None:
        """Red: fixed + warped (50 %) + segment outlines + folded voxels; Yellow: the Jacobian
        determinant (blue < 1 < red) with folded voxels outlined; Green: as Red, coronal."""
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        overlay, jacobian = preview.preview_layers(self._fixedVolumeId, stepPreview)
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
        preview.show_only_segmentation(slicer.mrmlScene, stepPreview.proxies.get("segmentation"))

    def _showCandidates(self, steps, step: int, name: str) -> None:
        self._stepCandidates = preview.candidates_table(
            slicer.mrmlScene, steps, f"{name} candidates of the step", only_step=step,
            node=self._stepCandidates if self._stepCandidates is not None
            and self._stepCandidates.GetScene() is slicer.mrmlScene else None)
        self.ui.candidatesTableView.setMRMLTableNode(self._stepCandidates)

    def onStepChanged(self, value: float) -> None:
        if self._outputs is None:
            return
        step = int(round(value))
        preview.select_step(slicer.mrmlScene, self._outputs.preview, step)
        steps = self._outputs.result.steps
        self.ui.stepTitleLabel.text = preview.step_title(steps[step - 1], len(steps))
        self._showCandidates(self._outputs.result.steps, step, self._outputs.preview.name)

    def onSave(self) -> None:
        if self._outputs is None:
            return
        folder = self.ui.saveDirectoryButton.directory
        with slicer.util.tryWithErrorDisplay(_("Saving failed."), waitCursor=True):
            written = self.logic.sceneLogic.save_outputs(self._outputs, folder)
            self.ui.statusLabel.text = _("Saved {n} files to {folder}").format(n=len(written), folder=folder)

    # -- fine-tuning --------------------------------------------------------------------------------
    def onFinetuneOrCancel(self) -> None:
        if self._run is not None and self._runKind == "finetune":
            self._onUpdate(self._run.cancel())
            return
        if self._run is not None or not self._ensureDependencies():
            return
        p = self._parameterNode
        self._runKind = "finetune"  # errors below go to the fine-tune status line
        exported = None
        try:
            if not p.checkpointOut:
                raise MorphSeekError(_("choose where to save the fine-tuned checkpoint"))
            if p.finetuneFromScene:
                # Scene cases are exported here, on the main thread; the worker reads the files.
                cases = training.cases_from_segmentations(self.ui.finetuneSegmentationsComboBox.checkedNodes())
                with slicer.util.WaitCursor():
                    exported = self.logic.sceneLogic.export_cases(cases)
                dataset = exported
                self.ui.finetuneStatusLabel.text = _("{n} cases: {train} training pairs, {val} held-back pairs").format(
                    n=len(exported.subjects), train=len(exported.train_pairs), val=len(exported.val_pairs))
            else:
                dataset = p.datasetPath
            run = FinetuneRun(slicer.mrmlScene, dataset, p.modelPath or None, p.checkpointOut,
                              warmup_iterations=p.warmupIterations, episodes=p.episodes,
                              steps=p.steps, trajectories=max(2, p.trajectories),
                              device=p.device, launch=self._launch()).start()  # GRPO's own temperature, not the candidates'
        except Exception as error:  # MorphSeekError: too few cases, no shared segment, a 2D volume...
            if exported is not None:
                exported.cleanup()
            self._showError(error)
            return
        self._startRun("finetune", run)

    def _showTrainingProgress(self, update) -> None:
        row = update.payload
        total = max(int(row.get("total", 1)), 1)
        self.ui.finetuneProgressBar.value = int(100 * int(row.get("done", 0)) / total)
        self.ui.finetuneStatusLabel.text = update.message
        run = self._run
        if run is not None and run.chart is not None and run.chart is not self._trainingChart:
            self._trainingChart = run.chart
            slicer.modules.plots.logic().ShowChartInLayout(run.chart)


class MorphSeekLogic(ScriptedLoadableModuleLogic):
    """Slicer's module logic: the panel's parameter node. The work on the scene is done by
    ``sceneLogic`` (``MorphSeekLib.logic.SceneLogic``: register, fine-tune, export, save), which
    scripts can also use directly."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return MorphSeekParameterNode(super().getParameterNode())

    @property
    def sceneLogic(self) -> SceneLogic:
        """The Qt-free logic on the application's current scene."""
        return SceneLogic(slicer.mrmlScene)


class MorphSeekTest(ScriptedLoadableModuleTest):
    """The scenario of the pytest suite (Testing/slicer), run inside Slicer: the module logic builds,
    and, when PyTorch is installed, a registration runs through the worker process and is checked."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_module_logic()
        self.setUp()
        self.test_registration_scenario()

    def test_module_logic(self) -> None:
        logic = MorphSeekLogic()
        parameters = logic.getParameterNode()
        parameters.steps = 2
        self.assertEqual(logic.getParameterNode().steps, 2)
        self.assertIs(logic.sceneLogic.scene, slicer.mrmlScene)

    def test_registration_scenario(self) -> None:
        missing = dependencies.missing()
        if missing:
            # A build machine's factory test: the extension loads and its logic works without torch.
            what = "PyTorch is not installed" if "torch" in missing else f"{', '.join(missing)} not installed"
            self.delayDisplay(f"{what} (missing: {', '.join(missing)}): the registration part of the self-test "
                              "is skipped (install them from the MorphSeek panel to run it)")
            return
        from MorphSeekLib import selftest

        scenario = selftest.scenario(slicer.mrmlScene, slicer.app.temporaryPath)
        self.delayDisplay(scenario.description)
        outputs = selftest.register_in_worker(scenario, SceneLogic(slicer.mrmlScene), workerLaunch(), device="cpu")
        self.assertEqual(scenario.check(slicer.mrmlScene, outputs), [])
        self.delayDisplay("Test passed")
