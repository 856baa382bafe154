"""MorphSeek's Gaussian policy on the top feature, its log-likelihood (LDVN) and KL, the full model.

docs/METHOD.md, "The network" and "Stage C": two 1x1x1 convolutions on f_L give
``mu = tanh(W_mu f_L) * lambda_scale`` and ``log_sigma = clip(W_logsigma f_L, s_min, s_max)``;
the decoder receives ``z = mu + tau * sigma * eps`` (tau = 0: z = mu exactly) with the backbone's
skips. ``model.config`` returns the complete JSON-serialisable dict from which
``nets.registry.build_model(config)`` rebuilds the model (what a checkpoint stores).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import MorphSeekError
from ..runconfig import RunConfig
from .base import Backbone, Tensor


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
        if backbone_name is None:
            from .registry import backbone_key  # the registry imports this module

            backbone_name = backbone_key(type(backbone))
        self.backbone_name = backbone_name
        #: how it was trained and how images are prepared for it (``load_checkpoint`` and the
        #: trainers set it; a model built from scratch has the defaults)
        self.run_config = RunConfig()

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


def __getattr__(name: str):
    # The registry moved to ``nets.registry`` (it imports this module, so this one cannot import it
    # at load time); ``from morphseek.nets.policy import build_model`` keeps working.
    if name in ("BACKBONES", "HEAD_DEFAULTS", "build_model"):
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
