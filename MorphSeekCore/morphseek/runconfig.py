"""THE run configuration: what a checkpoint says about how its model was trained and how images are
prepared for it (torch-free: the command line and the Slicer module's process read it too).

A checkpoint stores it as the JSON mapping ``config`` (``RunConfig.to_dict``); ``load_checkpoint``
returns it as a :class:`RunConfig` (``RunConfig.from_dict``), also kept on the model as
``model.run_config``. Every reader uses its attributes; what a checkpoint does not say takes the
default written here, which comes from ``defaults.py``: there is no other fallback.

The typed fields are those the engine reads (registration, data loading, GRPO fine-tuning, the
warm-up's resume check). Everything else the run saved (its training settings such as
``learning_rate`` or ``seed``, a model's ``provenance``, keys of a hand-made checkpoint) is kept
as saved in ``record`` and written back unchanged by ``to_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from types import SimpleNamespace
from typing import Any, Mapping

from . import defaults
from .errors import MorphSeekError

#: The similarities a run may name (``losses.similarity_loss``).
SIMILARITIES = ("mse", "ncc", "mind")
#: Keys older checkpoints used for settings that have another name now.
RENAMED = {"lr": "learning_rate", "val_every": "validate_every"}


@dataclass(frozen=True)
class RunConfig:
    """A checkpoint's run configuration (read-only; ``dataclasses.replace`` makes a changed copy).

    Attributes:
        stage: "warmup", "finetune", or "model" (a checkpoint that names no stage).
        grid: the model grid (D, H, W), or None: the model grid follows the voxel size (``spacing``),
            else the caller's or ``defaults.MODEL_GRID``.
        spacing: the model grid by voxel size (mm): ``io.model_grid_at(fixed, spacing, divisor,
            direction)``; None: by ``grid``.
        direction: that grid's direction (9 numbers), None: the fixed image's.
        percentiles: intensity normalisation (``io.normalise_intensities``).
        similarity: the warm-up's similarity ("mse", "ncc", "mind"), also GRPO's unless its own
            configuration names one.
        window: the local NCC window of that similarity (voxels of the model grid).
        presmooth: the Gaussian blur (voxels) of both images inside that similarity
            (``losses.presmoothed``; 0: none), GRPO's too unless its configuration names a similarity.
        clean_similarity: the warm-up's similarity compared the pairs' noise-free images
            (``WarmupConfig.clean_similarity``); GRPO's L_warm does too on pairs that carry them.
        lambda_reg: the warm-up's diffusion weight, GRPO's unless its configuration names one
            (default ``defaults.GRPO_LAMBDA_REG_FALLBACK``: a checkpoint that names none).
        beta_kl: the warm-up's KL weight, GRPO's first one.
        iterations: warm-up iterations the run was set to (None: not a warm-up).
        grpo: the GRPO settings of a fine-tuned checkpoint, as saved (None: not fine-tuned).
        record: every other key the run saved, as saved.
    """

    stage: str = "model"
    grid: tuple[int, int, int] | None = None
    spacing: float | None = None
    direction: tuple[float, ...] | None = None
    percentiles: tuple[float, float] = defaults.PERCENTILES
    similarity: str = defaults.SIMILARITY
    window: int = defaults.NCC_WINDOW
    presmooth: float = 0.0
    clean_similarity: bool = False
    lambda_reg: float = defaults.GRPO_LAMBDA_REG_FALLBACK
    beta_kl: float = defaults.BETA_KL
    iterations: int | None = None
    grpo: Mapping[str, Any] | None = None
    record: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Check the values: MorphSeekError naming the bad one."""
        _check(self, "run configuration")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "run configuration") -> "RunConfig":
        """A saved mapping -> RunConfig. Keys it lacks take the defaults; keys of older versions
        (``lr``, ``val_every``) are read under their names of now; unknown keys go to ``record``.
        Raises MorphSeekError naming ``where`` (e.g. "checkpoint PATH") for a value that cannot work:
        a grid that is not three positive sizes, percentiles outside 0 <= low < high <= 100, an
        unknown similarity, a weight or learning rate that is not finite."""
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise MorphSeekError(f"{where}: its configuration is a {type(data).__name__}, not a mapping")
        data = {RENAMED.get(key, key): value for key, value in data.items()}
        typed = {f.name for f in fields(cls)} - {"record"}
        values = {key: data[key] for key in typed if data.get(key) is not None}
        record = {key: value for key, value in data.items() if key not in typed}
        if "grid" in values:
            values["grid"] = _sizes(values["grid"], where)
        if "percentiles" in values:
            values["percentiles"] = _pair(values["percentiles"], where)
        if "direction" in values:
            values["direction"] = _numbers(values["direction"], where, "direction")
        for key, kind in (("spacing", float), ("lambda_reg", float), ("beta_kl", float), ("presmooth", float), ("window", int),
                          ("iterations", int), ("stage", str), ("similarity", str)):
            if key in values:
                try:
                    values[key] = kind(values[key])
                except (TypeError, ValueError):
                    raise MorphSeekError(f"{where}: its configuration's {key} {values[key]!r} is not "
                                         f"a {kind.__name__}") from None
        if "clean_similarity" in values and not isinstance(values["clean_similarity"], bool):
            raise MorphSeekError(f"{where}: its configuration's clean_similarity "
                                 f"{values['clean_similarity']!r} is not true or false")
        if "grpo" in values and not isinstance(values["grpo"], Mapping):
            raise MorphSeekError(f"{where}: its configuration's grpo settings are not a mapping")
        defaults_ = {f.name: f.default for f in fields(cls) if f.name != "record"}
        _check(SimpleNamespace(**{**defaults_, **values, "record": record}), where)
        return cls(**values, record=record)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready mapping a checkpoint stores (``from_dict`` reads it back equal)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "record":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = _plain(value)
            out[f.name] = value
        out.update(_plain(self.record))
        return out

    def with_stage(self, stage: str, **changes) -> "RunConfig":
        """A copy for another stage of the same run (e.g. "finetune" with its ``grpo`` settings)."""
        return replace(self, stage=stage, **changes)


def _plain(mapping: Mapping) -> dict:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in mapping.items()}


def _sizes(grid, where: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(n) for n in grid)
    except (TypeError, ValueError):
        raise MorphSeekError(f"{where}: its configuration's grid {grid!r} is not three sizes") from None
    if len(sizes) != 3 or any(n < 1 for n in sizes):
        raise MorphSeekError(f"{where}: its configuration's grid {list(grid)} is not three sizes >= 1")
    return sizes  # type: ignore[return-value]


def _pair(percentiles, where: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in percentiles)
        valid = 0 <= low < high <= 100
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise MorphSeekError(f"{where}: its configuration's percentiles {percentiles!r} are not "
                             "two numbers 0 <= low < high <= 100")
    return low, high


def _numbers(values, where: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise MorphSeekError(f"{where}: its configuration's {name} {values!r} is not a list of numbers") from None


def _check(config, where: str) -> None:
    if config.similarity not in SIMILARITIES:
        raise MorphSeekError(f"{where}: its configuration names an unknown similarity {config.similarity!r} "
                             "(mse, ncc or mind)")
    for key in ("lambda_reg", "beta_kl", "spacing", "presmooth"):
        value = getattr(config, key)
        if value is not None and not math.isfinite(value):
            raise MorphSeekError(f"{where}: its configuration's {key} is {value}")
    if config.presmooth < 0:
        raise MorphSeekError(f"{where}: its configuration's presmooth is {config.presmooth} (voxels, >= 0)")
    rate = config.record.get("learning_rate")
    if isinstance(rate, float) and not math.isfinite(rate):
        raise MorphSeekError(f"{where}: its configuration's learning_rate is {rate}")
