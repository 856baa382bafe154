"""The parts of the Slicer module that need the desktop application (Qt panel, CMake build) are
checked statically: the .ui is valid XML with every widget the widget code uses, the CMake files
list every script, and the Extensions Index entry and the icons are well formed. (The module file
itself is loaded and its classes built against Slicer's own base classes in test_module_load.py,
which also connects every parameter binding of the .ui with Slicer's own parameterNodeWrapper.)"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "MorphSeekSlicer"
UI_FILE = MODULE / "Resources" / "UI" / "MorphSeek.ui"
MODULE_FILE = MODULE / "MorphSeek.py"


@pytest.fixture(scope="module")
def ui():
    return ElementTree.parse(UI_FILE).getroot()  # raises on invalid XML


@pytest.fixture(scope="module")
def module_tree():
    return ast.parse(MODULE_FILE.read_text())


def ui_widget_names(root) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def test_ui_is_a_qt_designer_file(ui):
    assert ui.tag == "ui" and ui.find("class").text == "MorphSeek"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget"
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    used = set(ui_widget_names(ui).values())
    qt_classes = {c for c in used if c.startswith("Q")}
    assert used - qt_classes <= declared, f"custom widgets not declared: {used - qt_classes - declared}"


def test_every_widget_the_code_uses_exists_in_the_ui(ui, module_tree):
    names = ui_widget_names(ui)
    used = {node.attr for node in ast.walk(module_tree)  # self.ui.NAME
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    assert used, "the widget uses no .ui widget?"
    assert used <= set(names), f"missing in MorphSeek.ui: {sorted(used - set(names))}"


def test_every_mrml_widget_receives_the_scene(ui):
    """A qMRML combo box or table view shows nothing until it has the scene: each must receive
    the top widget's mrmlSceneChanged (the fine-tune case picker included)."""
    mrml_widgets = {name for name, cls in ui_widget_names(ui).items()
                    if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    assert "finetuneSegmentationsComboBox" in mrml_widgets
    receivers = {c.find("receiver").text for c in ui.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml_widgets <= receivers, f"never given the scene: {sorted(mrml_widgets - receivers)}"


def test_module_library_imports_without_qt():
    import MorphSeekLib.process  # noqa: F401
    import MorphSeekLib.runs  # noqa: F401
    import MorphSeekLib.logic  # noqa: F401
    import MorphSeekLib.preview  # noqa: F401

    for path in (MODULE / "MorphSeekLib").glob("*.py"):  # every import, also those inside functions
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"qt", "ctk", "PythonQt"}, f"{path.name} imports Qt"


def test_cmake_files_follow_slicer_conventions():
    top = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({variable}\s", top), variable
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', top)
    assert "find_package(Slicer REQUIRED)" in top and "add_subdirectory(MorphSeekSlicer)" in top
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in top and "Slicer_EXTENSION_CPACK" in top
    module = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module
    listed = set(re.findall(r"\$\{MODULE_NAME\}(Lib/\w+\.py|\.py)", module))
    present = {"Lib/" + p.name for p in (MODULE / "MorphSeekLib").glob("*.py")} | {".py"}
    assert listed == present, f"CMake lists {sorted(listed)}, the folder has {sorted(present)}"
    for resource in re.findall(r"(Resources/\S+/\$\{MODULE_NAME\}\.\w+)", module):
        assert (MODULE / resource.replace("${MODULE_NAME}", "MorphSeek")).is_file(), resource


def test_dataset_picker_browses_folders():
    """ctkPathLineEdit opens a file dialog as soon as Files is among its filters: a dataset folder
    could not be picked by browsing. Only folders (a folder may hold a manifest.json)."""
    tree = ElementTree.parse(UI_FILE).getroot()
    picker = next(w for w in tree.iter("widget") if w.get("name") == "datasetPathLineEdit")
    filters = next(p for p in picker.findall("property") if p.get("name") == "filters").find("set").text
    flags = set(filters.split("|"))
    assert "ctkPathLineEdit::Dirs" in flags and "ctkPathLineEdit::Files" not in flags, filters


def test_extensions_index_entry_and_icons():
    text = (REPO / "MorphSeek.json").read_text()
    entry = json.loads(text)
    # The index's CI: repository name starting with "Slicer"; arrays one item per line (its prettier).
    assert entry["scm_url"] == "https://github.com/morphseek/SlicerMorphSeek.git"
    assert '"build_dependencies": [\n    "PyTorch"\n  ]' in text
    top = (REPO / "CMakeLists.txt").read_text()
    urls = re.findall(r"https://\S+?(?=[\s\"])", top)
    assert urls and all("/morphseek/SlicerMorphSeek/" in url for url in urls), urls
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["build_dependencies"] == ["PyTorch"] and entry["category"] == "Registration"
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}
    assert set(entry) <= allowed, "the catalog schema allows no other keys"
    for icon in (REPO / "Resources/Icons/MorphSeek.png", MODULE / "Resources/Icons/MorphSeek.png"):
        data = icon.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert (width, height) == (128, 128)
    assert "Apache License" in (REPO / "LICENSE.txt").read_text()[:200]

