"""The backbone registry: named presets and ``build_model(config)``, the one place a MorphSeekNet is
built from the JSON-serialisable configuration a checkpoint stores (``model.config``).

The Gaussian policy head and the model class are :mod:`morphseek.nets.policy`; the backbones are
:mod:`morphseek.nets.voxelmorph` and :mod:`morphseek.nets.transmorph`.
"""

from __future__ import annotations

from typing import Any

from ..errors import MorphSeekError
from .base import Backbone
from .policy import GaussianPolicyHead, MorphSeekNet
from .transmorph import TransMorph
from .voxelmorph import VoxelMorph

__all__ = ["BACKBONES", "HEAD_DEFAULTS", "build_model", "backbone_key"]

#: preset name -> (backbone class, its constructor's arguments)
BACKBONES: dict[str, tuple[type[Backbone], dict[str, Any]]] = {
    "tiny": (VoxelMorph, {"enc_channels": [8, 16, 16, 16], "dec_channels": [16, 16, 16, 16, 16, 8, 8]}),
    "voxelmorph": (VoxelMorph, {"enc_channels": [16, 32, 32, 32], "dec_channels": [32, 32, 32, 32, 32, 16, 16]}),
    # Decoder mirrors the encoder widths, then three full-resolution convolutions: 10.0 M parameters.
    # The paper gives "about 27 M" for its VoxelMorph-L without its decoder; widen dec_channels to match.
    "voxelmorph-l": (
        VoxelMorph,
        {"enc_channels": [32, 64, 128, 256, 256], "dec_channels": [256, 256, 128, 64, 32, 32, 16, 16]},
    ),
    "transmorph-tiny": (TransMorph, {"embed_dim": 12, "depths": [2, 2, 2, 2], "heads": [2, 2, 4, 4], "window": 2}),
    # TransMorph's own sizes (46.7 M parameters); window 4 instead of its OASIS-specific (5, 6, 7).
    "transmorph": (TransMorph, {"embed_dim": 96, "depths": [2, 2, 4, 2], "heads": [4, 4, 8, 8], "window": 4}),
}
HEAD_DEFAULTS: dict[str, float] = {"lambda_scale": 3.0, "s_min": -5.0, "s_max": 1.0}


def backbone_key(cls: type) -> str:
    """The registry name of a backbone class (its full-size preset's name)."""
    for name, (preset_cls, _) in BACKBONES.items():
        if preset_cls is cls and name in ("voxelmorph", "transmorph"):
            return name
    raise MorphSeekError(f"{cls.__name__} is not a registered backbone class")


def build_model(config: dict[str, Any]) -> MorphSeekNet:
    """Build a MorphSeekNet from {"backbone": preset name, backbone arguments..., "lambda_scale",
    "s_min", "s_max"}; missing arguments take the preset's and the head's defaults."""
    if not isinstance(config, dict) or "backbone" not in config:
        raise MorphSeekError(f"a model config must be a dict with a 'backbone' key, got {config!r}")
    name = config["backbone"]
    if name not in BACKBONES:
        raise MorphSeekError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    cls, defaults = BACKBONES[name]
    try:
        head_args = {k: float(config.get(k, v)) for k, v in HEAD_DEFAULTS.items()}
    except (TypeError, ValueError) as error:
        raise MorphSeekError(f"bad Gaussian head settings in model config {config!r}: {error}") from error
    backbone_args = {**defaults, **{k: v for k, v in config.items() if k != "backbone" and k not in HEAD_DEFAULTS}}
    try:
        backbone = cls(**backbone_args)
    except TypeError as error:
        raise MorphSeekError(f"bad arguments for backbone {name!r}: {error}") from error
    return MorphSeekNet(backbone, GaussianPolicyHead(backbone.top_channels, **head_args), backbone_name=name)
