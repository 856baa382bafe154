"""Slicer without its application: a scene with the logics the application would register, and
slice views rendered offscreen to PNG files (used by the tests and for the README's screenshots).

Inside Slicer none of this is needed: the application owns the scene, the logics and the views.
Set ``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow`` before VTK opens its first window to render
with EGL (Mesa's software renderer works without a display; see docs/SLICER.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .preview import SliceViewLayers, apply_layers

_APPLICATION_LOGIC: dict[int, slicer.vtkSlicerApplicationLogic] = {}

SLICE_DISPLAYABLE_MANAGERS = (
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLTransformsDisplayableManager2D",
)


def new_scene() -> slicer.vtkMRMLScene:
    """A scene set up as Slicer's application sets it up (application logic, colour nodes, slice
    orientation presets, crosshair), also published as ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    crosshair = slicer.vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    _APPLICATION_LOGIC[id(scene)] = app_logic
    slicer.mrmlScene = scene
    return scene


def application_logic(scene: slicer.vtkMRMLScene) -> slicer.vtkSlicerApplicationLogic:
    """The application logic ``new_scene`` created for ``scene``."""
    logic = _APPLICATION_LOGIC.get(id(scene))
    if logic is None or logic.GetMRMLScene() != scene:  # ids are reused after a scene is freed
        raise KeyError("this scene was not made by offscreen.new_scene()")
    return logic


class OffscreenSliceView:
    """One slice view: vtkMRMLSliceLogic + displayable managers (segmentations, transforms) in an
    offscreen render window. The slice image actor is added before the displayable managers add
    theirs, so that segmentations are drawn on top of the volumes."""

    def __init__(self, scene: slicer.vtkMRMLScene, name: str = "Red", size: tuple[int, int] = (400, 400)):
        self.scene = scene
        self.size = size
        app_logic = application_logic(scene)
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(*size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.renderer)
        # Displayable managers expect an interactor (they crash without one).
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(scene)
        self.slice_node = self.logic.AddSliceNode(name)

        # The slice image: RGBA 0..255 produced by the slice logic (window/level already applied).
        self.image_mapper = vtk.vtkImageMapper()
        self.image_mapper.SetColorWindow(255)
        self.image_mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(self.image_mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.image_actor)

        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        for manager in SLICE_DISPLAYABLE_MANAGERS:
            if not factory.IsDisplayableManagerRegistered(manager):
                factory.RegisterDisplayableManager(manager)
        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.slice_node)

    def show(self, layers: SliceViewLayers, orientation: str = "Axial", offset: float | None = None) -> None:
        """Set the layers, the orientation and the slice position (mm; centre of the volume if None)."""
        apply_layers(self.logic.GetSliceCompositeNode(), self.slice_node, layers)
        self.slice_node.SetOrientation(orientation)
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToAll()
        if offset is not None:
            self.logic.SetSliceOffset(offset)
        # The slice logic's output port changes with the layers: connect after setting them.
        self.image_mapper.SetInputConnection(self.logic.GetImageDataConnection())

    def capture(self) -> np.ndarray:
        """Render and return the view as an (H, W, 3) uint8 array, top row first."""
        self.logic.UpdatePipeline() if hasattr(self.logic, "UpdatePipeline") else None
        self.window.Render()
        grabber = vtk.vtkWindowToImageFilter()
        grabber.SetInput(self.window)
        grabber.ReadFrontBufferOff()
        grabber.Update()
        image = grabber.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        return pixels.reshape(height, width, -1)[::-1, :, :3].copy()

    def save_png(self, path: str | Path) -> np.ndarray:
        """Render, write a PNG and return the pixels (H, W, 3)."""
        pixels = self.capture()
        write_png(pixels, path)
        return pixels

    def close(self) -> None:
        """Release the render window and detach the slice logic."""
        self.managers.SetMRMLDisplayableNode(None)
        application_logic(self.scene).GetSliceLogics().RemoveItem(self.logic)
        self.window.Finalize()


def write_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 array, top row first, as a PNG file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, channels = pixels.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    flat = np.ascontiguousarray(pixels[::-1]).reshape(-1, channels)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return path


def side_by_side(*panels: np.ndarray, gap: int = 4) -> np.ndarray:
    """Panels of the same height next to each other, separated by a white gap."""
    height = panels[0].shape[0]
    spacer = np.full((height, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, panel in enumerate(panels):
        if i:
            parts.append(spacer)
        parts.append(panel)
    return np.concatenate(parts, axis=1)
