"""Checkpoints that rebuild their model: safetensors weights + a JSON configuration, saved
atomically, loaded without ever running code, resumable exactly.

Files. A checkpoint named ``NAME`` (or ``NAME.safetensors``, ``NAME.json``, ``NAME.pt``: the suffix
is dropped) is two files side by side:

* ``NAME.safetensors``: every tensor (the weights under ``model/``, the optimiser's moments and the
  random generators' states under ``t/N``) and, in its header's metadata, the whole JSON document
  below. It is self-contained: the header is the authoritative record, and a model exchanged as
  this one file loads.
* ``NAME.json``: a readable copy of the configuration (``model_config``, ``config``, versions, a
  summary of the training state) with the SHA-256 of the ``.safetensors`` file and the save's id.
  It is written after the weights; when its id matches the header's, loading checks the checksum (a
  corrupt download is refused); a ``.json`` left from an earlier save (a run killed between the two
  renames) is ignored, so a checkpoint is usable at every moment.

Neither format can hold code: safetensors stores raw tensors, JSON plain values. The JSON document
is ``format_version`` (2), ``model_config`` (``model.config``: rebuilds the network with
``build_model``), ``config`` (grid, normalisation, similarity, training hyper-parameters...),
``optimizer`` and ``state`` (epoch, iteration, random states, KL controller... for resuming; None
when not saved), ``morphseek_version``, ``torch_version``, ``save_id``. Tensors inside ``optimizer``
/ ``state`` / ``config`` are stored as ``{"__tensor__": key}``, tuples as ``{"__tuple__": [...]}``
and dicts with non-string keys as ``{"__items__": [[key, value], ...]}``, so that
``random.Random.setstate`` and ``Optimizer.load_state_dict`` get back exactly what was saved. NumPy
scalars are stored as Python numbers, NumPy arrays as tensors, paths as strings; any other object is
refused with a MorphSeekError naming where it is.

Backward compatibility: a file written by ``torch.save`` (the format-1 ``.pt`` checkpoints of
MorphSeek 0.1) is still read, with ``torch.load(weights_only=True)`` (tensors and plain values
only). When both ``NAME.safetensors`` and a legacy ``NAME.pt`` exist, the ``.safetensors`` is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import uuid
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import __version__
from .atomic import check_writable_folder, write_bytes
from .checkpoint_names import CHECKPOINT_SUFFIXES, CONFIG_SUFFIX, WEIGHTS_SUFFIX, checkpoint_files, find_checkpoint  # noqa: F401
from .errors import MorphSeekError
from .nets.policy import MorphSeekNet
from .nets.registry import build_model
from .runconfig import RunConfig

FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1
# The naming rule lives in the torch-free checkpoint_names (the Slicer module's process uses it too).


def checkpoint_exists(path: str | os.PathLike) -> bool:
    """True when a checkpoint (new or legacy format) can be found for ``path``."""
    return find_checkpoint(path) is not None


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


class _Encoder:
    """Turns nested plain values with tensors into a JSON-ready structure and a tensor table."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def tensor(self, value: torch.Tensor) -> dict:
        key = f"t/{len(self.tensors)}"
        self.tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}

    def encode(self, value: Any, where: str) -> Any:
        if value is None:
            return None
        for plain in (bool, int, float, str):  # subclasses (enums, TorchVersion) are stored as the base type
            if isinstance(value, plain):
                return plain(value)
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return self.tensor(torch.from_numpy(np.ascontiguousarray(value)))
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value):
                return {k: self.encode(v, f"{where}[{k!r}]") for k, v in value.items()}
            return {"__items__": [[self.encode(k, f"{where} key"), self.encode(v, f"{where}[{k!r}]")]
                                  for k, v in value.items()]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        raise MorphSeekError(
            f"cannot store {where} ({type(value).__name__}) in a checkpoint: only tensors, numbers, "
            f"strings, None, lists, tuples and dicts of them are allowed"
        )


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, where) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            try:
                return tensors[value["__tensor__"]]
            except KeyError:
                raise MorphSeekError(f"checkpoint {where}: incomplete, tensor {value['__tensor__']!r} "
                                     "is missing") from None
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors, where) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value["__items__"]}
        return {k: _decode(v, tensors, where) for k, v in value.items()}
    return value


def _summary(state: dict | None) -> dict:
    """The scalar entries of a training state (iteration, episode...), for the readable JSON."""
    out = {}
    for key, value in (state or {}).items():
        if isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, dict):
            inner = _summary(value)
            if inner:
                out[key] = inner
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: RunConfig | Mapping[str, Any] | None,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a MorphSeekNet, possibly ``torch.compile``-d), the run ``config`` (a RunConfig,
    or a mapping read as ``RunConfig.from_dict`` reads it, so a configuration that cannot work is
    refused here; None: ``RunConfig()``) and, for
    resuming, the optimiser and trainer ``state`` as ``NAME.safetensors`` + ``NAME.json`` (see the
    module notes), each atomically (a temporary file in the same folder, flushed to disk, its size
    checked, then ``os.replace``): a crash or a full disk never leaves a half-written checkpoint, and
    a failed save leaves the previous one as it was. Returns the ``.safetensors`` path."""
    weights, sidecar = checkpoint_files(path)
    net = getattr(model, "_orig_mod", model)  # torch.compile wrapper -> the module itself
    if not isinstance(net, MorphSeekNet):
        raise MorphSeekError(f"checkpoint {weights}: can only save a MorphSeekNet, got {type(net).__name__}")
    if not isinstance(config, RunConfig):
        config = RunConfig.from_dict(config, f"checkpoint {weights}")
    encoder = _Encoder()
    document = {
        "format_version": FORMAT_VERSION,
        "model_config": encoder.encode(net.config, "model config"),
        "config": encoder.encode(config.to_dict(), "config"),
        "optimizer": encoder.encode(optimizer.state_dict(), "optimizer state") if optimizer is not None else None,
        "state": encoder.encode(dict(state), "state") if state is not None else None,
        "morphseek_version": __version__,
        "torch_version": str(torch.__version__),
        "save_id": uuid.uuid4().hex,
    }
    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    tensors.update(encoder.tensors)
    data = safetensors_bytes(tensors, metadata={"format": "morphseek", "morphseek": json.dumps(document)})
    readable = {
        "format_version": FORMAT_VERSION,
        "weights": weights.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "save_id": document["save_id"],
        "model_config": document["model_config"],
        "config": document["config"],
        "resumable": optimizer is not None or state is not None,
        "state_summary": _summary(state),
        "morphseek_version": __version__,
        "torch_version": document["torch_version"],
    }
    try:
        weights.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MorphSeekError(f"checkpoint {weights}: cannot create its folder ({error.strerror or error})") from None
    write_bytes(data, weights)
    write_bytes((json.dumps(readable, indent=2) + "\n").encode(), sidecar)
    return weights


def _load_legacy(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle errors of every kind: corrupt, truncated, foreign, unsafe
        if isinstance(error, pickle.UnpicklingError):
            # torch's own message suggests weights_only=False, i.e. running the file's code: never.
            raise MorphSeekError(
                f"checkpoint {path}: refused: it holds Python objects other than tensors and plain values, "
                "which could run code when loaded (not a MorphSeek checkpoint, or a tampered one). "
                "MorphSeek only loads safe checkpoints; ask for the model as .safetensors + .json"
            ) from None
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "weights_only" in detail:
            detail = type(error).__name__
        raise MorphSeekError(
            f"checkpoint {path}: cannot be read (corrupt, truncated, or not a MorphSeek checkpoint): {detail}"
        ) from None


def _load_safetensors(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # SafetensorError, OSError: corrupt, truncated, not safetensors
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MorphSeekError(
            f"checkpoint {path}: cannot be read (corrupt, truncated, or not a MorphSeek checkpoint): {detail}"
        ) from None
    if metadata.get("format") != "morphseek" or "morphseek" not in metadata:
        raise MorphSeekError(f"checkpoint {path}: not a MorphSeek checkpoint (a safetensors file without "
                             "MorphSeek's configuration in its header)")
    try:
        document = json.loads(metadata["morphseek"])
    except json.JSONDecodeError as error:
        raise MorphSeekError(f"checkpoint {path}: its configuration is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise MorphSeekError(f"checkpoint {path}: not a MorphSeek checkpoint (no format_version)")
    _, sidecar = checkpoint_files(path)
    if sidecar.is_file():
        try:
            readable = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            readable = {}
        if isinstance(readable, dict) and readable.get("save_id") == document.get("save_id"):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if readable.get("sha256") != digest:
                raise MorphSeekError(f"checkpoint {path}: corrupt: its checksum does not match the one in "
                                     f"{sidecar.name} (a damaged copy?); copy the checkpoint again")
    payload = {key: _decode(value, tensors, path) for key, value in document.items()}
    if "model_config" in document or "format_version" in document:
        prefix = "model/"
        payload["state_dict"] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not payload["state_dict"]:
            payload.pop("state_dict")
    return payload


def _run_config(path: Path, config: Any, model: MorphSeekNet) -> RunConfig:
    """The run configuration, read and checked where the engine relies on it (``RunConfig.from_dict``:
    grid, normalisation, similarity, weights), and its grid against the model's backbone."""
    run_config = RunConfig.from_dict(config, f"checkpoint {path}")
    if run_config.grid is not None and any(n % model.divisor for n in run_config.grid):
        raise MorphSeekError(
            f"checkpoint {path}: its configuration's grid {list(run_config.grid)} is not three sizes that are "
            f"multiples of {model.divisor} (what its {model.config.get('backbone', 'backbone')} backbone needs)")
    return run_config


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[MorphSeekNet, RunConfig, dict[str, Any]]:
    """Rebuild the model from the checkpoint ``path`` (``NAME``, ``NAME.safetensors``, ``NAME.json``
    or a legacy ``NAME.pt``) on ``device`` -> (model, run config (a ``RunConfig``), extra) where extra holds
    "optimizer" (None if not saved), "state" ({} if not saved), "morphseek_version", "torch_version",
    "format_version" and "path" (the file read). The model is in training mode, as ``nn.Module``s
    are built; its run config is also ``model.run_config``. Every problem raises a
    MorphSeekError naming the file."""
    target = resolve_device(device)
    file = find_checkpoint(path)
    if file is None:
        raise MorphSeekError(f"checkpoint {path}: file not found")
    if not os.access(file, os.R_OK):
        raise MorphSeekError(f"checkpoint {file}: permission denied")
    with open(file, "rb") as handle:
        legacy = handle.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
    payload = _load_legacy(file) if legacy else _load_safetensors(file)
    path = file
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise MorphSeekError(f"checkpoint {path}: not a MorphSeek checkpoint (no format_version)")
    expected = LEGACY_FORMAT_VERSION if legacy else FORMAT_VERSION
    if payload["format_version"] != expected:
        raise MorphSeekError(
            f"checkpoint {path}: format version {payload['format_version']!r}, this MorphSeek "
            f"({__version__}) reads version {expected} in this kind of file"
        )
    missing = [key for key in ("model_config", "state_dict") if key not in payload]
    if missing:
        raise MorphSeekError(f"checkpoint {path}: incomplete, missing {', '.join(missing)}")
    if not isinstance(payload["model_config"], dict):
        raise MorphSeekError(f"checkpoint {path}: its model configuration is not a mapping")
    try:
        model = build_model(payload["model_config"])
    except MorphSeekError as error:
        raise MorphSeekError(f"checkpoint {path}: cannot rebuild its model: {error}") from error
    except (TypeError, ValueError, KeyError) as error:
        raise MorphSeekError(f"checkpoint {path}: cannot rebuild its model from its configuration "
                             f"{payload['model_config']}: {error}") from None
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise MorphSeekError(
            f"checkpoint {path}: its weights do not match its model configuration "
            f"{payload['model_config']}: {error}"
        ) from error
    model.to(target)
    config = _run_config(path, payload.get("config"), model)
    model.run_config = config
    extra = {key: payload.get(key) for key in ("optimizer", "morphseek_version", "torch_version")}
    extra["state"] = payload.get("state") or {}
    extra["format_version"] = payload["format_version"]
    extra["path"] = path
    return model, config, extra


def load_model(model: MorphSeekNet | str | Path, device: torch.device | str = "cpu") -> tuple[MorphSeekNet, RunConfig]:
    """A model object, or a checkpoint path -> (the model in eval mode on ``device``, its run
    configuration): ``load_checkpoint``'s for a path, ``model.run_config`` for an object."""
    if isinstance(model, (str, Path)):
        model, config, _ = load_checkpoint(model, device=device)
    else:
        config = getattr(model, "_orig_mod", model).run_config
        model = model.to(device)
    model.eval()
    return model, config


def describe_checkpoint(path: str | os.PathLike) -> str | None:
    """One line about the checkpoint at ``path`` (its stage and progress), None when there is none
    or it cannot be read (for messages such as "what was kept" after an interruption)."""
    file = find_checkpoint(path)
    if file is None:
        return None
    try:
        _, config, extra = load_checkpoint(file)
    except MorphSeekError:
        return None
    state = extra.get("state") or {}
    stage = config.stage
    if "iteration" in state:
        return f"{file} ({stage}, {state['iteration']} of {config.iterations or '?'} iterations)"
    grpo = state.get("grpo") or {}
    if "episode" in grpo:
        return f"{file} ({stage}, {grpo['episode']} episodes done)"
    return f"{file} ({stage})"


def dataset_files(dataset) -> list[Path]:
    """Every file a dataset reads (its manifest, images and label maps): outputs must never replace them."""
    files = [Path(dataset.source)] if Path(dataset.source).is_file() else []
    for subject in getattr(dataset, "subjects", []):
        files += [Path(p) for p in (subject.image, subject.labels) if p is not None]
    return files


def check_checkpoint_target(out: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                            inputs=(), logs=()) -> None:
    """Refuse a training ``--out`` before any work starts.

    Raises MorphSeekError naming ``out`` when one of its files (``NAME.safetensors``, ``NAME.json``,
    the run's ``logs``) is one of the ``inputs`` (a dataset manifest, an image, the starting model:
    they are never overwritten); when a checkpoint already exists there and neither ``resume`` nor
    ``overwrite`` is given (it may be another run's trained model); when a path is a folder; when its
    folder cannot be created or written."""
    weights, sidecar = checkpoint_files(out)
    targets = {os.path.abspath(p): p for p in (weights, sidecar, *logs)}
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = os.path.abspath(str(item))
        for file in ([source] + [os.path.abspath(f) for f in checkpoint_files(source)]
                     if Path(source).suffix in CHECKPOINT_SUFFIXES else [source]):
            if file in targets:
                raise MorphSeekError(f"--out '{out}' would overwrite the input '{item}' ({targets[file]}); "
                                     "choose another --out")
    for path in targets.values():
        if Path(path).is_dir():
            raise MorphSeekError(f"--out '{out}': '{path}' is a folder; a checkpoint name is needed "
                                 "(e.g. model.safetensors)")
    existing = describe_checkpoint(out) if checkpoint_exists(out) else None
    if checkpoint_exists(out) and not resume and not overwrite:
        raise MorphSeekError(
            f"--out '{out}' already holds a checkpoint{': ' + existing if existing else ''}; add --resume to "
            "continue that run, --overwrite to replace it, or choose another --out")
    check_writable_folder(weights.parent, out)
