"""MorphSeek's Gaussian policy on the top feature, its log-likelihood (LDVN) and KL, the full model.

docs/METHOD.md, "The network" and "Stage C": two 1x1x1 convolutions on f_L give
``mu = tanh(W_mu f_L) * lambda_scale`` and ``log_sigma = clip(W_logsigma f_L, s_min, s_max)``;
the decoder receives ``z = mu + tau * sigma * eps`` (tau = 0: z = mu exactly) with the backbone's
skips. ``build_model(config)`` builds a model from a JSON-serialisable dict and ``model.config``
returns the complete dict, so that a checkpoint can rebuild the model.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import MorphSeekError
from .base import Backbone, Tensor
from .transmorph import TransMorph
from .voxelmorph import VoxelMorph


class Encoded(NamedTuple):
    """Output of ``MorphSeekNet.encode``: skips f_1..f_{L-1} and the policy's mean and log-std."""

    skips: list[Tensor]
    mu: Tensor
    log_sigma: Tensor


class GaussianPolicyHead(nn.Module):
    """Two 1x1x1 convolutions on f_L (C channels) -> (mu, log_sigma), each (B, C, D_L, H_L, W_L).

    Initialisation: W_mu = I / lambda_scale, zero bias, so that initially
    mu = lambda_scale * tanh(f_L / lambda_scale), i.e. f_L itself softly clipped to +-lambda_scale
    (a pretrained plain backbone keeps its behaviour where |f_L| is small); W_logsigma = 0 and zero
    bias, so that sigma = 1 everywhere: the prior N(0, I) the KL term pulls towards.
    """

    def __init__(self, channels: int, lambda_scale: float = 3.0, s_min: float = -5.0, s_max: float = 1.0):
        super().__init__()
        if channels < 1 or lambda_scale <= 0 or not s_min < s_max:
            raise MorphSeekError(
                f"Gaussian head needs channels >= 1, lambda_scale > 0 and s_min < s_max "
                f"(got {channels}, {lambda_scale}, ({s_min}, {s_max}))"
            )
        self.channels, self.lambda_scale = int(channels), float(lambda_scale)
        self.s_min, self.s_max = float(s_min), float(s_max)
        self.mu_conv = nn.Conv3d(channels, channels, kernel_size=1)
        self.log_sigma_conv = nn.Conv3d(channels, channels, kernel_size=1)
        with torch.no_grad():
            self.mu_conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1, 1) / self.lambda_scale)
            self.mu_conv.bias.zero_()
            self.log_sigma_conv.weight.zero_()
            self.log_sigma_conv.bias.zero_()

    def forward(self, top: Tensor) -> tuple[Tensor, Tensor]:
        mu = torch.tanh(self.mu_conv(top)) * self.lambda_scale
        log_sigma = torch.clamp(self.log_sigma_conv(top), self.s_min, self.s_max)
        return mu, log_sigma


class MorphSeekNet(nn.Module):
    """A backbone with the Gaussian policy head between its encoder and decoder."""

    def __init__(self, backbone: Backbone, head: GaussianPolicyHead, backbone_name: str | None = None):
        super().__init__()
        if head.channels != backbone.top_channels:
            raise MorphSeekError(
                f"Gaussian head has {head.channels} channels but the backbone's top feature has "
                f"{backbone.top_channels}"
            )
        self.backbone, self.head = backbone, head
        self.backbone_name = backbone_name or _class_key(type(backbone))

    @property
    def divisor(self) -> int:
        """Every grid size must be a multiple of this."""
        return self.backbone.divisor

    @property
    def top_channels(self) -> int:
        return self.backbone.top_channels

    @property
    def config(self) -> dict[str, Any]:
        """The complete JSON-serialisable configuration; ``build_model(model.config)`` rebuilds it."""
        return {
            "backbone": self.backbone_name,
            **self.backbone.config(),
            "lambda_scale": self.head.lambda_scale,
            "s_min": self.head.s_min,
            "s_max": self.head.s_max,
        }

    def encode(self, moving: Tensor, fixed: Tensor) -> Encoded:
        """(B, 1, D, H, W) pair -> Encoded(skips, mu, log_sigma)."""
        skips, top = self.backbone.encode(moving, fixed)
        mu, log_sigma = self.head(top)
        return Encoded(skips, mu, log_sigma)

    def sample(
        self,
        enc: Encoded | tuple[Tensor, Tensor],
        tau: float,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """z = mu + tau * sigma * eps, eps ~ N(0, I) drawn from ``generator`` (the global RNG when
        None). tau = 0 returns mu itself. Differentiable in mu and log_sigma (reparameterisation)."""
        mu, log_sigma = (enc.mu, enc.log_sigma) if isinstance(enc, Encoded) else enc
        if tau < 0:
            raise MorphSeekError(f"the sampling temperature tau must be >= 0, got {tau}")
        if tau == 0:
            return mu
        eps_device = generator.device if generator is not None else mu.device
        eps = torch.randn(mu.shape, generator=generator, device=eps_device, dtype=mu.dtype).to(mu.device)
        return mu + tau * torch.exp(log_sigma) * eps

    def decode(self, skips: list[Tensor], z: Tensor) -> Tensor:
        """Skips and a latent -> displacement (B, 3, D, H, W) in voxels (pull-back)."""
        return self.backbone.decode(skips, z)

    def forward(self, moving: Tensor, fixed: Tensor, tau: float = 0.0,
                generator: torch.Generator | None = None) -> Tensor:
        enc = self.encode(moving, fixed)
        return self.decode(enc.skips, self.sample(enc, tau, generator))


def ldvn_log_prob(z: Tensor, mu: Tensor, log_sigma: Tensor, tau: float, scale: str | float = "sqrt") -> Tensor:
    """LDVN-scaled log-likelihood of z under N(mu, (tau sigma)^2), one value per batch item (B,).

    log pi = -(1 / (2 s)) * sum_i [((z_i - mu_i) / (tau sigma_i))^2 + log(2 pi tau^2 sigma_i^2)],
    summed over all N = C * D * H * W latent dimensions; s = sqrt(N) for "sqrt", 1 for "none"
    (the exact log-density), or the positive float given (the trainer's adaptive scale).
    """
    if tau <= 0:
        raise MorphSeekError(f"the log-likelihood needs tau > 0 (got {tau}): at tau = 0 the policy is deterministic")
    if z.shape != mu.shape or log_sigma.shape != mu.shape:
        raise MorphSeekError(f"z {tuple(z.shape)}, mu {tuple(mu.shape)} and log_sigma {tuple(log_sigma.shape)} differ")
    n = mu[0].numel()
    if scale == "sqrt":
        s = math.sqrt(n)
    elif scale == "none":
        s = 1.0
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0:
        s = float(scale)
    else:
        raise MorphSeekError(f"LDVN scale must be 'sqrt', 'none' or a positive number, got {scale!r}")
    log_std = math.log(tau) + log_sigma
    terms = ((z - mu) * torch.exp(-log_std)) ** 2 + 2.0 * log_std + math.log(2.0 * math.pi)
    return -terms.flatten(1).sum(dim=1) / (2.0 * s)


def kl_standard_normal(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) per latent dimension, averaged over dimensions and batch."""
    return 0.5 * (torch.exp(2.0 * log_sigma) + mu**2 - 1.0 - 2.0 * log_sigma).mean()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_parameter_fraction(model: MorphSeekNet) -> float:
    """Parameters of the Gaussian head as a fraction of the backbone's (METHOD.md: under 3 %)."""
    return count_parameters(model.head) / count_parameters(model.backbone)


# Presets: name -> (backbone class, constructor arguments). A config may override any argument.
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


def _class_key(cls: type) -> str:
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
