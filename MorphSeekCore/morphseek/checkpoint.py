"""Checkpoints that rebuild their model: save atomically, load safely, pick a device.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (dict, list,
tuple, str, int, float, bool, None), so that it loads with ``torch.load(weights_only=True)``: opening
a checkpoint can never run code, which matters when models are passed around between hospitals.

Contents: ``format_version`` (1), ``model_config`` (``model.config``: rebuilds the network with
``build_model``), ``config`` (grid, normalisation, similarity, training hyper-parameters...),
``state_dict`` (weights, on the CPU), ``optimizer`` (its state dict or None), ``state`` (epoch,
iteration, RNG states, history for resuming, or None), ``morphseek_version`` and ``torch_version``.
NumPy scalars in ``config`` / ``state`` are stored as Python numbers, NumPy arrays as tensors and
paths as strings; any other object is refused with a MorphSeekError naming where it is.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import MorphSeekError
from .io import give_default_permissions
from .nets.policy import MorphSeekNet, build_model

FORMAT_VERSION = 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" (or "mps") -> torch.device;
    MorphSeekError when the requested accelerator is not there."""
    spec = str(device).strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(spec)
    except (RuntimeError, ValueError) as error:
        raise MorphSeekError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise MorphSeekError(
                f"device {device!r} was requested but CUDA is not available (this PyTorch build "
                f"{torch.__version__} has no CUDA support or no GPU is visible); use 'cpu' or 'auto'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise MorphSeekError(f"device {device!r} was requested but only {count} CUDA device(s) are visible")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise MorphSeekError(f"device {device!r} was requested but Apple MPS is not available")
    elif resolved.type != "cpu":
        raise MorphSeekError(f"unsupported device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def _plain(value: Any, where: str) -> Any:
    """``value`` made of types ``torch.load(weights_only=True)`` accepts, or MorphSeekError."""
    if value is None:
        return None
    for plain in (bool, int, float, str):  # subclasses (enums, TorchVersion) would need unpickling code
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {_plain(k, f"{where} key"): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise MorphSeekError(
        f"cannot store {where} ({type(value).__name__}) in a checkpoint: only tensors, numbers, "
        f"strings, None, lists, tuples and dicts of them are allowed"
    )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a MorphSeekNet, possibly ``torch.compile``-d), the run ``config`` and, for
    resuming, the optimiser and trainer ``state`` to ``path`` atomically (a temporary file in the
    same folder, then ``os.replace``: a crash never leaves a half-written checkpoint)."""
    path = Path(path)
    net = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the module itself
    if not isinstance(net, MorphSeekNet):
        raise MorphSeekError(f"checkpoint {path}: can only save a MorphSeekNet, got {type(net).__name__}")
    payload = {
        "format_version": FORMAT_VERSION,
        "model_config": _plain(net.config, "model config"),
        "config": _plain(dict(config or {}), "config"),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "optimizer": _plain(optimizer.state_dict(), "optimizer state") if optimizer is not None else None,
        "state": _plain(dict(state), "state") if state is not None else None,
        "morphseek_version": __version__,
        "torch_version": str(torch.__version__),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise MorphSeekError(f"checkpoint {path}: cannot write to its folder ({error})") from error
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        give_default_permissions(tmp)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise MorphSeekError(f"checkpoint {path}: writing failed ({error})") from error
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[MorphSeekNet, dict[str, Any], dict[str, Any]]:
    """Rebuild the model from ``path`` on ``device`` -> (model, run config, extra) where extra holds
    "optimizer" (None if not saved), "state" ({} if not saved), "morphseek_version", "torch_version",
    "format_version". The model is in training mode, as ``nn.Module``s are built; its run config
    is also ``model.training_config``."""
    path = Path(path)
    target = resolve_device(device)
    if not path.is_file():
        raise MorphSeekError(f"checkpoint {path}: file not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle errors of every kind: corrupt, truncated, foreign
        raise MorphSeekError(
            f"checkpoint {path}: cannot be read (corrupt, truncated, or not a MorphSeek checkpoint): {error}"
        ) from error
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise MorphSeekError(f"checkpoint {path}: not a MorphSeek checkpoint (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise MorphSeekError(
            f"checkpoint {path}: format version {payload['format_version']!r}, this MorphSeek "
            f"({__version__}) reads version {FORMAT_VERSION}"
        )
    missing = [key for key in ("model_config", "state_dict") if key not in payload]
    if missing:
        raise MorphSeekError(f"checkpoint {path}: incomplete, missing {', '.join(missing)}")
    try:
        model = build_model(payload["model_config"])
    except MorphSeekError as error:
        raise MorphSeekError(f"checkpoint {path}: cannot rebuild its model: {error}") from error
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise MorphSeekError(
            f"checkpoint {path}: its weights do not match its model configuration "
            f"{payload['model_config']}: {error}"
        ) from error
    model.to(target)
    config = payload.get("config") or {}
    model.training_config = config
    extra = {key: payload.get(key) for key in ("optimizer", "morphseek_version", "torch_version")}
    extra["state"] = payload.get("state") or {}
    extra["format_version"] = payload["format_version"]
    return model, config, extra
