"""The step-by-step preview as MRML nodes: a sequence per kind of image (warped volume, warped
segmentation, Jacobian determinant, folded voxels) indexed by step under one sequence browser, the
colour maps that go with them, the candidates and metrics tables, and the slice-view layers that show
them (fixed in the background, warped in the foreground, label outlines, folding overlay).

Qt-free: the widget and the offscreen tests call the same functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from . import mrml

# Jacobian determinant colours: diverging around det = 1 (no volume change), blue = compression,
# red = expansion; the window [0, 2] puts 1 in the middle. Folded voxels (det <= 0) are drawn in the
# darkest blue here and highlighted on top by the folding overlay.
JACOBIAN_WINDOW = (0.0, 2.0)
JACOBIAN_COLORS_NAME = "MorphSeek Jacobian (diverging)"
FOLDING_COLORS_NAME = "MorphSeek folding"
FOLDING_COLOR = (1.0, 1.0, 0.0)  # yellow: visible on grey, on blue and on red
KINDS = ("warped", "segmentation", "jacobian", "folding")


@dataclass
class SliceViewLayers:
    """What one slice view shows (node IDs; None leaves a layer empty)."""

    background: str | None = None
    foreground: str | None = None
    foreground_opacity: float = 0.5
    label: str | None = None
    label_opacity: float = 1.0
    label_outline: bool = False


@dataclass
class StepPreview:
    """The nodes of the step preview: one sequence and one proxy (the node the views show) per kind
    present, all synchronised by ``browser`` (item n = step n + 1)."""

    browser: slicer.vtkMRMLSequenceBrowserNode
    sequences: dict[str, slicer.vtkMRMLSequenceNode] = field(default_factory=dict)
    name: str = ""  # the base of the node names
    proxies: dict[str, slicer.vtkMRMLNode] = field(default_factory=dict)

    @property
    def number_of_steps(self) -> int:
        master = self.browser.GetMasterSequenceNode()
        return master.GetNumberOfDataNodes() if master is not None else 0

    def nodes(self) -> list[slicer.vtkMRMLNode]:
        """Every node of the preview (for removal or saving)."""
        return [self.browser, *self.sequences.values(), *self.proxies.values()]


# ----------------------------------------------------------------------------------------------
# Colour maps and display styles
# ----------------------------------------------------------------------------------------------
def _named_node(scene: slicer.vtkMRMLScene, class_name: str, name: str):
    nodes = scene.GetNodesByClassByName(class_name, name)
    node = nodes.GetItemAsObject(0) if nodes.GetNumberOfItems() else None
    return node


def diverging_color_table(scene: slicer.vtkMRMLScene, size: int = 256) -> slicer.vtkMRMLColorTableNode:
    """A blue - white - red table (reused if the scene already has it)."""
    table = _named_node(scene, "vtkMRMLColorTableNode", JACOBIAN_COLORS_NAME)
    if table is not None:
        return table
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", JACOBIAN_COLORS_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(size)
    transfer = vtk.vtkColorTransferFunction()
    transfer.SetColorSpaceToDiverging()
    transfer.AddRGBPoint(0.0, 0.230, 0.299, 0.754)  # Moreland's cool-warm end points
    transfer.AddRGBPoint(0.5, 0.865, 0.865, 0.865)
    transfer.AddRGBPoint(1.0, 0.706, 0.016, 0.150)
    for i in range(size):
        r, g, b = transfer.GetColor(i / (size - 1))
        table.SetColor(i, "", r, g, b, 1.0)
    table.SetAttribute("Category", "MorphSeek")
    return table


def folding_color_table(scene: slicer.vtkMRMLScene) -> slicer.vtkMRMLColorTableNode:
    """Label colours for the folding overlay: 0 transparent, 1 = folded (det <= 0)."""
    table = _named_node(scene, "vtkMRMLColorTableNode", FOLDING_COLORS_NAME)
    if table is not None:
        return table
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", FOLDING_COLORS_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(2)
    table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    table.SetColor(1, "folded (det J <= 0)", *FOLDING_COLOR, 1.0)
    return table


def folding_labels(jacobian: sitk.Image) -> sitk.Image:
    """1 where det(J) <= 0, else 0 (uint8, same grid)."""
    folded = sitk.GetArrayViewFromImage(jacobian) <= 0
    labels = sitk.GetImageFromArray(folded.astype(np.uint8))
    labels.CopyInformation(jacobian)
    return labels


def style_jacobian(node: slicer.vtkMRMLScalarVolumeNode, scene: slicer.vtkMRMLScene) -> None:
    """Diverging colours, fixed window [0, 2] centred on det = 1."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(diverging_color_table(scene).GetID())
    display.AutoWindowLevelOff()
    low, high = JACOBIAN_WINDOW
    display.SetWindowLevelMinMax(low, high)


def style_folding(node: slicer.vtkMRMLLabelMapVolumeNode, scene: slicer.vtkMRMLScene) -> None:
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAndObserveColorNodeID(folding_color_table(scene).GetID())


def style_segmentation_outline(node: slicer.vtkMRMLSegmentationNode, thickness: int = 2) -> None:
    """Outlines only in slice views (the images stay visible inside the structures)."""
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetVisibility2DFill(False)
    display.SetVisibility2DOutline(True)
    display.SetSliceIntersectionThickness(thickness)


# ----------------------------------------------------------------------------------------------
# Step sequences
# ----------------------------------------------------------------------------------------------
def sequences_logic(scene: slicer.vtkMRMLScene):
    """Slicer's sequences module logic inside Slicer; a new one on ``scene`` without the application."""
    modules = getattr(slicer, "modules", None)
    sequences = getattr(modules, "sequences", None) if modules is not None else None
    if sequences is not None:
        return sequences.logic()
    logic = _STANDALONE_SEQUENCES_LOGIC.get(id(scene))
    if logic is None or logic.GetMRMLScene() != scene:  # ids are reused after a scene is freed
        logic = slicer.vtkSlicerSequencesLogic()
        logic.SetMRMLScene(scene)
        _STANDALONE_SEQUENCES_LOGIC[id(scene)] = logic
    return logic


_STANDALONE_SEQUENCES_LOGIC: dict[int, object] = {}


PREVIEW_KINDS = {
    "warped": ("vtkMRMLScalarVolumeNode", lambda s: s.warped),
    "segmentation": ("vtkMRMLSegmentationNode", lambda s: s.warped_seg),
    "jacobian": ("vtkMRMLScalarVolumeNode", lambda s: s.jacobian),
    "folding": ("vtkMRMLLabelMapVolumeNode", lambda s: folding_labels(s.jacobian) if s.jacobian else None),
}


def start_step_preview(scene: slicer.vtkMRMLScene, name: str) -> StepPreview:
    """An empty step preview (its sequence browser); ``add_step`` fills it as steps arrive."""
    sequences_logic(scene)  # also registers the sequence node classes with the scene
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} steps")
    preview = StepPreview(browser)
    preview.name = name
    return preview


def add_step(scene: slicer.vtkMRMLScene, preview: StepPreview, step, scheme: mrml.LabelScheme | None,
             select: bool = True) -> None:
    """Add one step (a ``StepRecord``-like object with warped / warped_seg / jacobian on the fixed
    grid) to every sequence of the preview; the kinds present in the first step make the sequences.
    ``select``: show the new step in the proxy nodes (the live preview follows the run)."""
    name = preview.name
    first = not preview.sequences
    for kind, (class_name, image_of) in PREVIEW_KINDS.items():
        image = image_of(step)
        if image is None or (not first and kind not in preview.sequences):
            continue
        sequence = preview.sequences.get(kind)
        if sequence is None:
            sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} {kind} sequence")
            sequence.SetIndexName("step")
            sequence.SetIndexUnit("")
            sequence.SetIndexType(sequence.NumericIndex)
            preview.sequences[kind] = sequence
        with mrml.temporary_nodes(scene):
            if class_name == "vtkMRMLSegmentationNode":
                item = mrml.labels_to_segmentation(image, scene, f"{name} {kind}", scheme or mrml.LabelScheme())
            else:
                item = mrml.image_to_volume(image, scene, f"{name} {kind}",
                                            labelmap=class_name == "vtkMRMLLabelMapVolumeNode")
            sequence.SetDataNodeAtValue(item, str(step.index))
    if not preview.sequences:
        raise ValueError("the steps carry no images to preview")
    browser = preview.browser
    if first:
        master = preview.sequences.get("warped") or next(iter(preview.sequences.values()))
        browser.SetAndObserveMasterSequenceNodeID(master.GetID())
        for sequence in preview.sequences.values():
            if sequence is not master:
                browser.AddSynchronizedSequenceNodeID(sequence.GetID())
    browser.SetSelectedItemNumber(preview.number_of_steps - 1 if select or first else browser.GetSelectedItemNumber())
    sequences_logic(scene).UpdateProxyNodesFromSequences(browser)
    for kind, sequence in preview.sequences.items():
        proxy = browser.GetProxyNode(sequence)
        if kind not in preview.proxies:
            proxy.SetName(f"{name} {kind} (step preview)")
        preview.proxies[kind] = proxy
    _style_proxies(scene, preview)


def build_step_preview(scene: slicer.vtkMRMLScene, steps: Sequence, scheme: mrml.LabelScheme | None,
                       name: str) -> StepPreview:
    """Sequences of the steps' images (``StepRecord``s with warped / warped_seg / jacobian on the fixed
    grid), a browser synchronising them, and styled proxy nodes showing the first step."""
    preview = start_step_preview(scene, name)
    for step in steps:
        add_step(scene, preview, step, scheme, select=False)
    select_step(scene, preview, 1)
    return preview


def _style_proxies(scene: slicer.vtkMRMLScene, preview: StepPreview) -> None:
    if "jacobian" in preview.proxies:
        style_jacobian(preview.proxies["jacobian"], scene)
    if "folding" in preview.proxies:
        style_folding(preview.proxies["folding"], scene)
    if "segmentation" in preview.proxies:
        style_segmentation_outline(preview.proxies["segmentation"])
    if "warped" in preview.proxies and preview.proxies["warped"].GetDisplayNode() is None:
        preview.proxies["warped"].CreateDefaultDisplayNodes()


def select_step(scene: slicer.vtkMRMLScene, preview: StepPreview, step: int) -> None:
    """Show step ``step`` (1-based) in every proxy node."""
    count = preview.number_of_steps
    if not 1 <= step <= count:
        raise ValueError(f"step {step} is outside 1..{count}")
    preview.browser.SetSelectedItemNumber(step - 1)
    sequences_logic(scene).UpdateProxyNodesFromSequences(preview.browser)
    _style_proxies(scene, preview)


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
def _column(table: vtk.vtkTable, array_class, name: str, values) -> None:
    array = array_class()
    array.SetName(name)
    for value in values:
        array.InsertNextValue(value)
    table.AddColumn(array)


def _percent(value: float | None) -> float:
    return math.nan if value is None else 100.0 * float(value)


STEP_KINDS = {"network": "network", "adapt": "test-time optimisation"}


def step_kind(step) -> str:
    """What made a step, for tables and labels: "network" (a policy step) or "test-time
    optimisation" (``kind == "adapt"``: the map optimised on this pair after the network's steps)."""
    kind = getattr(step, "kind", "network") or "network"
    return STEP_KINDS.get(kind, kind)


def step_title(step, total: int | None = None) -> str:
    """The preview's caption of a step: "step 2 of 4: network", "step 4 of 4: test-time optimisation"."""
    of = f" of {total}" if total else ""
    return f"step {step.index}{of}: {step_kind(step)}"


def _number(value: float | None) -> float:
    """A table value: NaN where the engine gives none (e.g. candidates are not scored when J = 1)."""
    return math.nan if value is None else float(value)


def candidates_table(scene: slicer.vtkMRMLScene, steps: Sequence, name: str, only_step: int | None = None,
                     node: slicer.vtkMRMLTableNode | None = None) -> slicer.vtkMRMLTableNode:
    """One row per candidate of every step (or of step ``only_step``): reward, Dice gain (percentage
    points), similarity gain, NJD %, whether it was kept, and the step's kind (``step_kind``: the
    test-time optimisation step has one candidate, its reward the similarity gain). ``node``: a
    table to refill."""
    rows = [(step.index, j + 1, c, j == step.kept, step_kind(step)) for step in steps
            for j, c in enumerate(step.candidates) if only_step is None or step.index == only_step]
    table = vtk.vtkTable()
    _column(table, vtk.vtkIntArray, "step", [r[0] for r in rows])
    _column(table, vtk.vtkIntArray, "candidate", [r[1] for r in rows])
    _column(table, vtk.vtkDoubleArray, "reward", [_number(r[2].reward) for r in rows])
    _column(table, vtk.vtkDoubleArray, "Dice gain (pp)", [_percent(r[2].dice_gain) for r in rows])
    _column(table, vtk.vtkDoubleArray, "similarity gain", [_number(r[2].similarity_gain) for r in rows])
    _column(table, vtk.vtkDoubleArray, "NJD %", [_number(r[2].njd_percent) for r in rows])
    _column(table, vtk.vtkStringArray, "kept", ["kept" if r[3] else "" for r in rows])
    _column(table, vtk.vtkStringArray, "step kind", [r[4] for r in rows])
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    node.SetColumnDescription("Dice gain (pp)", "mean Dice gained over the previous step, percentage points")
    node.SetColumnDescription("NJD %", "folded voxels (det J <= 0) of the candidate's total map, model grid")
    node.SetUseColumnTitleAsColumnHeader(True)
    return node


def metrics_table(scene: slicer.vtkMRMLScene, steps: Sequence, scheme: mrml.LabelScheme | None,
                  initial_dice: float | None, name: str) -> slicer.vtkMRMLTableNode:
    """One row per step (step 0 = before the deformable steps, after pre-alignment): mean Dice %,
    NJD % on the fixed grid, seconds, kept candidate (0: none, as for step 0 and the test-time
    optimisation), the step's kind (``step_kind``), and Dice % per structure."""
    labels = sorted({label for step in steps for label in (step.dice_per_label or {})})
    table = vtk.vtkTable()
    _column(table, vtk.vtkIntArray, "step", [0] + [s.index for s in steps])
    _column(table, vtk.vtkDoubleArray, "Dice %", [math.nan if initial_dice is None else initial_dice]
            + [math.nan if s.dice is None else float(s.dice) for s in steps])
    _column(table, vtk.vtkDoubleArray, "NJD %", [math.nan] + [float(s.njd_percent) for s in steps])
    _column(table, vtk.vtkDoubleArray, "seconds", [math.nan] + [float(s.seconds) for s in steps])
    _column(table, vtk.vtkIntArray, "kept candidate",
            [0] + [0 if getattr(s, "kind", "network") == "adapt" else s.kept + 1 for s in steps])
    _column(table, vtk.vtkStringArray, "step kind", ["initial"] + [step_kind(s) for s in steps])
    for label in labels:
        title = scheme.name_of(label) if scheme is not None else f"label {label}"
        _column(table, vtk.vtkDoubleArray, f"Dice % {title}",
                [math.nan] + [float((s.dice_per_label or {}).get(label, math.nan)) for s in steps])
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.SetAndObserveTable(table)
    node.SetColumnDescription("NJD %", "voxels of the fixed grid whose Jacobian determinant is <= 0")
    node.SetUseColumnTitleAsColumnHeader(True)
    return node


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------
def preview_layers(fixed_id: str, preview: StepPreview) -> tuple[SliceViewLayers, SliceViewLayers]:
    """The two views of the preview: (fixed + warped + folding overlay, Jacobian + folding outline).
    Segmentation outlines come from the segmentation proxy's display node, in every view."""
    folding = preview.proxies.get("folding")
    warped = preview.proxies.get("warped")
    jacobian = preview.proxies.get("jacobian")
    overlay = SliceViewLayers(background=fixed_id, foreground=warped.GetID() if warped else None,
                              foreground_opacity=0.5, label=folding.GetID() if folding else None,
                              label_opacity=0.8)
    jacobian_view = SliceViewLayers(background=jacobian.GetID() if jacobian else None,
                                    label=folding.GetID() if folding else None, label_opacity=1.0,
                                    label_outline=True)
    return overlay, jacobian_view


def apply_layers(composite: slicer.vtkMRMLSliceCompositeNode, slice_node: slicer.vtkMRMLSliceNode,
                 layers: SliceViewLayers) -> None:
    """Put ``layers`` into a slice view (its composite and slice nodes)."""
    composite.SetBackgroundVolumeID(layers.background)
    composite.SetForegroundVolumeID(layers.foreground)
    composite.SetForegroundOpacity(layers.foreground_opacity)
    composite.SetLabelVolumeID(layers.label)
    composite.SetLabelOpacity(layers.label_opacity)
    slice_node.SetUseLabelOutline(layers.label_outline)


# ----------------------------------------------------------------------------------------------
# Fine-tuning plot
# ----------------------------------------------------------------------------------------------
TRAINING_SERIES = (("reward_mean", "mean reward"), ("dice_best", "best Dice"))


def training_plot(scene: slicer.vtkMRMLScene, history: Sequence[dict], name: str = "MorphSeek fine-tuning",
                  chart: slicer.vtkMRMLPlotChartNode | None = None) -> slicer.vtkMRMLPlotChartNode:
    """A plot chart of the GRPO updates so far (mean reward and best Dice per optimiser step);
    called again with the same ``chart`` it updates the curves in place (live plot)."""
    rows = [row for row in history if "optimizer_step" in row]
    table = vtk.vtkTable()
    _column(table, vtk.vtkDoubleArray, "update", [float(r["optimizer_step"]) for r in rows])
    for key, title in TRAINING_SERIES:
        _column(table, vtk.vtkDoubleArray, title, [float(r.get(key, math.nan)) for r in rows])
    if chart is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} history")
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
        chart.SetTitle(name)
        chart.SetXAxisTitle("GRPO update")
        for _, title in TRAINING_SERIES:
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
            series.SetAndObserveTableNodeID(table_node.GetID())
            series.SetXColumnName("update")
            series.SetYColumnName(title)
            series.SetPlotType(series.PlotTypeScatter)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
    series = chart.GetNthPlotSeriesNode(0)
    series.GetTableNode().SetAndObserveTable(table)
    return chart


# ----------------------------------------------------------------------------------------------
# What the preview changes in the views, and putting it back
# ----------------------------------------------------------------------------------------------
def show_only_segmentation(scene: slicer.vtkMRMLScene, keep: slicer.vtkMRMLSegmentationNode | None) -> None:
    """Hide every segmentation in slice views but ``keep`` (the others would cover its outlines)."""
    for node in _nodes_of_class(scene, "vtkMRMLSegmentationNode"):
        if node is not keep and node.GetDisplayNode() is not None:
            node.GetDisplayNode().SetVisibility2D(False)


def _nodes_of_class(scene: slicer.vtkMRMLScene, class_name: str) -> list:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


@dataclass
class ViewSnapshot:
    """The slice views' layers, orientation, position and field of view, and each segmentation's
    2D visibility, as they were before a live preview took the views over; ``restore()`` puts them
    back (a run that is cancelled or fails leaves the views as it found them)."""

    views: list[tuple] = field(default_factory=list)
    visibility2d: list[tuple] = field(default_factory=list)

    def restore(self) -> None:
        for composite, slice_node, layers, slice_to_ras, fov in self.views:
            apply_layers(composite, slice_node, layers)
            slice_node.GetSliceToRAS().DeepCopy(slice_to_ras)  # orientation and position
            slice_node.SetFieldOfView(*fov)
            slice_node.UpdateMatrices()
        for display, visible in self.visibility2d:
            display.SetVisibility2D(visible)


def snapshot_views(scene: slicer.vtkMRMLScene, slice_logics) -> ViewSnapshot:
    """What ``apply_layers`` and ``show_only_segmentation`` will change, for ``ViewSnapshot.restore``."""
    snapshot = ViewSnapshot()
    for logic in slice_logics:
        composite, slice_node = logic.GetSliceCompositeNode(), logic.GetSliceNode()
        layers = SliceViewLayers(background=composite.GetBackgroundVolumeID(),
                                 foreground=composite.GetForegroundVolumeID(),
                                 foreground_opacity=composite.GetForegroundOpacity(),
                                 label=composite.GetLabelVolumeID(), label_opacity=composite.GetLabelOpacity(),
                                 label_outline=bool(slice_node.GetUseLabelOutline()))
        slice_to_ras = vtk.vtkMatrix4x4()
        slice_to_ras.DeepCopy(slice_node.GetSliceToRAS())
        snapshot.views.append((composite, slice_node, layers, slice_to_ras, tuple(slice_node.GetFieldOfView())))
    for node in _nodes_of_class(scene, "vtkMRMLSegmentationNode"):
        if node.GetDisplayNode() is not None:
            snapshot.visibility2d.append((node.GetDisplayNode(), bool(node.GetDisplayNode().GetVisibility2D())))
    return snapshot
