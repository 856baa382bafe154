"""``morphseek.checkpoint_names`` (torch-free, used by the Slicer module) finds the same files as
``morphseek.checkpoint`` for every way a user names a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from morphseek import checkpoint, checkpoint_names


@pytest.fixture
def folder(tmp_path):
    for name in ("new.safetensors", "new.json", "legacy.pt", "both.safetensors", "both.json", "both.pt",
                 "only-config.json", "weights-only.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "a-folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("given, expected", [
    ("new", "new.safetensors"),  # a bare name
    ("new.safetensors", "new.safetensors"),
    ("new.json", "new.safetensors"),
    ("new.pt", "new.safetensors"),  # an old name of a model now saved as safetensors
    ("new.pth", "new.safetensors"),
    ("legacy.pt", "legacy.pt"),
    ("legacy", None),  # a legacy file is found by its full name only
    ("both.pt", "both.safetensors"),  # safetensors first
    ("only-config.json", None),
    ("weights-only", "weights-only.safetensors"),
    ("absent", None),
    ("absent.pt", None),
    ("a-folder", None),
])
def test_both_modules_find_the_same_file(folder, given, expected):
    found = checkpoint_names.find_checkpoint(folder / given)
    assert found == checkpoint.find_checkpoint(folder / given)
    assert found == (None if expected is None else folder / expected)
    assert checkpoint_names.checkpoint_files(folder / given) == checkpoint.checkpoint_files(folder / given)


def test_the_suffixes_are_the_checkpoint_modules():
    assert checkpoint_names.CHECKPOINT_SUFFIXES == checkpoint.CHECKPOINT_SUFFIXES
    assert (checkpoint_names.WEIGHTS_SUFFIX, checkpoint_names.CONFIG_SUFFIX) == (checkpoint.WEIGHTS_SUFFIX,
                                                                                checkpoint.CONFIG_SUFFIX)


def test_importing_it_does_not_import_torch():
    code = "import sys, morphseek.checkpoint_names; sys.exit('torch' in sys.modules)"
    engine = Path(checkpoint_names.__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=engine).returncode == 0
