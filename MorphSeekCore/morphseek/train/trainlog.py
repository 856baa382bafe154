"""A small run logger shared by the trainers: one row per call, written as JSON lines and as CSV.

``RunLogger("runs/ft/log")`` writes ``runs/ft/log.jsonl`` and ``runs/ft/log.csv`` (a ``.jsonl`` or
``.csv`` suffix on the path is dropped). Every row is flushed to disk when it is logged, so a person
can follow a run with ``tail -f`` and a crash loses nothing already logged. Rows may carry different
keys: the CSV header is the union of all keys seen so far, in first-seen order; when a row brings a
new key the CSV is rewritten from the JSON lines (atomically), which stay the record of truth.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from morphseek.atomic import write_text

__all__ = ["RunLogger", "log_files"]


def log_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """The two files of the run log with stem ``path`` (a ``.jsonl`` or ``.csv`` suffix is dropped):
    ``(<stem>.jsonl, <stem>.csv)``."""
    stem = Path(path)
    if stem.suffix in (".jsonl", ".csv"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".jsonl"), stem.with_name(stem.name + ".csv")


def _plain(value: Any) -> Any:
    """JSON-ready scalar: tensors and NumPy scalars become Python numbers, NaN/inf become None."""
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            value = str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class RunLogger:
    """Append-only run log in two formats (``<stem>.jsonl`` and ``<stem>.csv``).

    ``append=False`` starts empty files; ``append=True`` keeps the rows already there (resume).
    Use :meth:`truncate` on resume to drop rows written after the checkpoint being resumed.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.jsonl_path, self.csv_path = log_files(path)
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        self._rows: list[dict[str, Any]] = []
        if append and self.jsonl_path.exists():
            with open(self.jsonl_path, encoding="utf-8") as handle:
                self._rows = [json.loads(line) for line in handle if line.strip()]
        self._columns: list[str] = []
        for row in self._rows:
            self._add_columns(row)
        self._rewrite()

    # -- public -------------------------------------------------------------------------------
    def log(self, row: dict[str, Any]) -> None:
        """Write one row (a flat dict of scalars) to both files and flush."""
        clean = {str(k): _plain(v) for k, v in row.items()}
        self._rows.append(clean)
        with open(self.jsonl_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
            handle.flush()
        if self._add_columns(clean):
            self._rewrite_csv()
        else:
            with open(self.csv_path, "a", encoding="utf-8", newline="") as handle:
                csv.DictWriter(handle, fieldnames=self._columns).writerow(clean)

    def rows(self) -> list[dict[str, Any]]:
        """Every row logged so far (including those kept from a resumed run)."""
        return list(self._rows)

    def truncate(self, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the rows for which ``keep(row)`` is true (e.g. those up to a checkpoint)."""
        self._rows = [row for row in self._rows if keep(row)]
        self._columns = []
        for row in self._rows:
            self._add_columns(row)
        self._rewrite()

    def close(self) -> None:
        """Nothing is held open between rows; present so callers can treat this like a file."""

    # -- internals ----------------------------------------------------------------------------
    def _add_columns(self, row: dict[str, Any]) -> bool:
        new = [key for key in row if key not in self._columns]
        self._columns.extend(new)
        return bool(new)

    def _rewrite(self) -> None:
        write_text("".join(json.dumps(row) + "\n" for row in self._rows), self.jsonl_path)
        self._rewrite_csv()

    def _rewrite_csv(self) -> None:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=self._columns)
        writer.writeheader()
        writer.writerows(self._rows)
        write_text(text.getvalue(), self.csv_path)
