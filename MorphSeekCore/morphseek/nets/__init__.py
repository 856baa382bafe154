"""Registration networks: backbones (VoxelMorph, TransMorph) and MorphSeek's Gaussian policy head."""

from .base import Backbone, flow_conv
from .policy import (
    BACKBONES,
    Encoded,
    GaussianPolicyHead,
    MorphSeekNet,
    build_model,
    count_parameters,
    head_parameter_fraction,
    kl_standard_normal,
    ldvn_log_prob,
)
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
