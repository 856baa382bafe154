"""THE atomic file write of the engine: write beside the target, flush to disk, rename over it.

A reader (Slicer polling a step's files, a person running ``tail``, a resumed run) never sees half a
file under a final name, and a failed write (full disk, no permission) leaves the previous file as
it was. Used by images (``io``), checkpoints, run logs, job files and reports. Folders written whole
(``outputs.staged_folder``) build on the same rename. No torch, no SimpleITK: the command line and
the run logger import it while ``--help`` stays fast.
"""

from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from .errors import MorphSeekError

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["umask", "give_default_permissions", "fsync_file", "atomic_target", "write_bytes", "write_text",
           "check_writable_folder"]


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_permissions(path: PathLike, mode: int = 0o666) -> None:
    """chmod a temporary file (or, with ``mode=0o777``, a folder) to what a plain ``open()`` /
    ``mkdir()`` would have given it (``mode`` minus the umask): ``mkstemp`` makes files only their
    owner can read, which would hide results from colleagues."""
    os.chmod(path, mode & ~umask())


def fsync_file(path: PathLike) -> None:
    """Flush a written file to the disk (so a full disk or I/O error surfaces here, not later)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _problem(path: Path, error: OSError) -> MorphSeekError:
    hint = " (is the disk full?)" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return MorphSeekError(f"cannot write '{path}': {error.strerror or error}{hint}")


@contextmanager
def atomic_target(path: PathLike, allow_empty: bool = False) -> Iterator[str]:
    """Yield a temporary file name in ``path``'s folder (same extension, so writers that choose the
    format from the extension still work); on success (the file exists, is not empty unless
    ``allow_empty``, and is flushed to disk) it replaces ``path`` atomically, on failure it is
    removed and ``path`` is left as it was. Parent folders are created. An OSError (full disk, no
    permission) becomes a MorphSeekError naming ``path``."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
    except OSError as error:
        raise _problem(path, error) from None
    try:
        yield tmp
        if not allow_empty and os.path.getsize(tmp) == 0:
            raise MorphSeekError(f"cannot write '{path}': nothing was written (is the disk full?)")
        fsync_file(tmp)
        give_default_permissions(tmp)
        os.replace(tmp, path)
    except OSError as error:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise _problem(path, error) from None
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_bytes(data: bytes, path: PathLike) -> Path:
    """Write ``data`` atomically (:func:`atomic_target`) and check its length on disk. Returns the path."""
    path = Path(path)
    with atomic_target(path, allow_empty=not data) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
        if os.path.getsize(tmp) != len(data):
            raise MorphSeekError(f"cannot write '{path}': only {os.path.getsize(tmp)} of {len(data)} bytes "
                                 "were written (is the disk full?)")
    return path


def write_text(text: str, path: PathLike) -> Path:
    """Write ``text`` (UTF-8) atomically and check its length on disk. Returns the path."""
    return write_bytes(text.encode("utf-8"), path)


def check_writable_folder(folder: PathLike, out: PathLike, option: str = "--out") -> None:
    """MorphSeekError (naming ``option`` and ``out``) unless ``folder`` can be created and written in:
    its nearest existing ancestor must be a folder this process may write to."""
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise MorphSeekError(f"{option} '{out}': '{existing}' is a file, so the folder cannot be created there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MorphSeekError(f"{option} '{out}': no permission to write in '{existing}' (read-only?); "
                             "choose a folder you can write to")
