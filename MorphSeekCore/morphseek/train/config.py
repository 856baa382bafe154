"""Stage C's configuration, without torch.

Imported by the command line while it builds its parser (``morphseek --help`` must not pay for
importing torch); :mod:`morphseek.train.grpo` re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass

from morphseek import defaults
from morphseek.errors import MorphSeekError

LDVN_MODES = ("sqrt", "adaptive", "none")
#: What GRPO updates: every weight, or the Gaussian policy head alone (the latent policy).
TRAINABLE = ("all", "head")


@dataclass
class GRPOConfig:
    """Every choice of stage C, with the defaults of METHOD.md / docs/GRPO.md."""

    steps: int = defaults.STEPS  # T, refinement steps per pair (one optimiser step each)
    fine_steps: int = 0  # of which the last ones on the pairs' fine grids (PairSample.fine), as registration runs them
    trajectories: int = defaults.GRPO_TRAJECTORIES  # J, sampled latents per step
    tau: float = defaults.GRPO_TAU  # exploration temperature (METHOD.md's 0.3 costs the mean latent, defaults.py)
    w_dice: float = defaults.W_DICE  # reward weight of the Dice gain (> 0)
    w_njd: float = defaults.W_NJD  # reward weight of the folding fraction (< 0)
    lambda_warm: float = 1.0  # weight of the warm-up objective (tau = 0, current state)
    lambda_dice: float = 1.0  # weight of the soft-Dice loss over the J trajectories
    learning_rate: float = 1e-4  # Adam
    ldvn: str = "sqrt"  # LDVN scale: sqrt(N), adaptive (fixed std of relative log pi), none (s = 1)
    ldvn_target_std: float = 1.0  # target std of the relative log-likelihoods for ldvn="adaptive"
    target_kl: float | None = None  # KL target; None: max(2 x the warm-up policy's KL, 0.01) (first step)
    beta_kl: float | None = None  # initial KL weight; None: the warm-up configuration's (or 1e-3)
    kl_tolerance: float = 1.5  # beta changes when KL leaves [target / tol, target * tol]
    kl_factor: float = 1.5  # multiplicative change of beta
    beta_kl_min: float = 1e-6
    beta_kl_max: float = 1.0
    similarity: str | None = None  # L_sim of L_warm; None: the warm-up configuration's (or "mse")
    lambda_reg: float | None = None  # diffusion weight of L_warm; None: warm-up config's (or 1.0)
    episodes: int | None = None  # pair visits (each T optimiser steps); None: one pass over the pairs
    validate_every: int = 1  # evaluate the held-back pairs every this many episodes (and after the last)
    checkpoint_every: int = 1  # save every this many episodes (and after the last)
    seed: int = 0
    memory_flat: bool = True  # False: build the whole graph at once (reference, J-times the memory)
    policy: bool = True  # False: no policy term (the Dice-supervised baselines of the ablation, J = 1, tau = 0)
    trainable: str = "all"  # TRAINABLE: "head" updates the policy head's two 1x1x1 convolutions only

    def check(self) -> None:
        """Raise MorphSeekError for settings that cannot work."""
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1 (got {self.steps})")
        if not 0 <= self.fine_steps <= self.steps:
            problems.append(f"fine_steps must be from 0 to steps ({self.steps}), got {self.fine_steps}")
        if self.policy and self.trajectories < 2:
            problems.append(f"trajectories must be >= 2 for group-relative advantages (got {self.trajectories})")
        if self.trajectories < 1:
            problems.append(f"trajectories must be >= 1 (got {self.trajectories})")
        if self.policy and not self.tau > 0:
            problems.append(f"tau must be > 0 in fine-tuning (got {self.tau})")
        if self.tau < 0:
            problems.append(f"tau must be >= 0 (got {self.tau})")
        if not self.w_dice > 0:
            problems.append(f"w_dice must be > 0 (got {self.w_dice})")
        if self.w_njd > 0:
            problems.append(f"w_njd must be <= 0 (got {self.w_njd})")
        if self.ldvn not in LDVN_MODES:
            problems.append(f"ldvn must be one of {LDVN_MODES} (got {self.ldvn!r})")
        if self.target_kl is not None and not self.target_kl > 0:
            problems.append(f"target_kl must be > 0 (got {self.target_kl})")
        if self.trainable not in TRAINABLE:
            problems.append(f"trainable must be one of {TRAINABLE} (got {self.trainable!r})")
        if min(self.lambda_warm, self.lambda_dice) < 0:
            problems.append("lambda_warm and lambda_dice must be >= 0")
        if self.lambda_reg is not None and self.lambda_reg < 0:
            problems.append(f"lambda_reg must be >= 0 (got {self.lambda_reg})")
        if problems:
            raise MorphSeekError("GRPO configuration: " + "; ".join(problems))
