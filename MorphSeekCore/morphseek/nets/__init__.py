"""Registration networks: backbones (VoxelMorph, TransMorph), MorphSeek's Gaussian policy head and the
model built from both (``policy``), and the registry of named presets with ``build_model`` (``registry``)."""

from .base import Backbone, flow_conv
from .policy import (
    Encoded,
    GaussianPolicyHead,
    MorphSeekNet,
    count_parameters,
    head_parameter_fraction,
    kl_standard_normal,
    ldvn_log_prob,
)
from .registry import BACKBONES, build_model
from .transmorph import TransMorph
from .voxelmorph import VoxelMorph

__all__ = [
    "BACKBONES",
    "Backbone",
    "Encoded",
    "GaussianPolicyHead",
    "MorphSeekNet",
    "TransMorph",
    "VoxelMorph",
    "build_model",
    "count_parameters",
    "flow_conv",
    "head_parameter_fraction",
    "kl_standard_normal",
    "ldvn_log_prob",
]
