"""Which files a checkpoint name means, without torch.

``morphseek.checkpoint`` reads and writes checkpoints and imports torch; callers that only need to
find the files (the 3D Slicer module, whose process never imports torch: the worker process loads
the model) use this module. The rule is the one ``morphseek.checkpoint`` documents: a checkpoint
named ``NAME`` (or ``NAME.safetensors``, ``NAME.json``, ``NAME.pt``, ``NAME.pth``: the suffix is
dropped) is ``NAME.safetensors`` + ``NAME.json``; a legacy ``.pt`` file given by its full name is
read when there is no ``.safetensors``. ``Testing/core/test_checkpoint_names.py`` checks that both
modules agree on every case.
"""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_SUFFIX = ".safetensors"
CONFIG_SUFFIX = ".json"
#: Suffixes dropped from a checkpoint name to find its two files.
CHECKPOINT_SUFFIXES = (WEIGHTS_SUFFIX, CONFIG_SUFFIX, ".pt", ".pth")


def checkpoint_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """(``NAME.safetensors``, ``NAME.json``) for a checkpoint named ``path``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in CHECKPOINT_SUFFIXES else path
    return stem.with_name(stem.name + WEIGHTS_SUFFIX), stem.with_name(stem.name + CONFIG_SUFFIX)


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The file a checkpoint named ``path`` is loaded from, or None when there is none: its
    ``.safetensors`` when that exists, else ``path`` itself when it is a file (a legacy ``.pt``)."""
    weights, _ = checkpoint_files(path)
    if weights.is_file():
        return weights
    path = Path(path)
    if path.is_file() and path.suffix != CONFIG_SUFFIX:
        return path
    return None
