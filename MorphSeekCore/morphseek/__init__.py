"""MorphSeek: latent-space policy optimisation for deformable 3D image registration.

Conventions (binding, see docs/CONVENTIONS.md): images are (B, 1, D, H, W) float32 in [0, 1]; a
displacement is (B, 3, D, H, W) in voxels of the model grid, channel c along array axis c, and means
pull-back: warped(x) = moving(x + u(x)).
"""

__version__ = "0.1.0"
