"""Stage C's algorithm: one GRPO update with LDVN (docs/METHOD.md, docs/GRPO.md).

For each labelled pair and each refinement step t = 1..T the current state (I_m o Phi_{t-1}, I_f) is
encoded once, J latents z_j = mu + tau sigma eps_j are sampled and decoded into step fields u_j, and
each composed map Phi_j = Phi_{t-1} o (x + u_j) is scored with hard labels (no gradient):

    R_j = w_dice * (Dice(S_f, S_m o Phi_j) - Dice(S_f, S_m o Phi_{t-1})) + w_njd * NJD(Phi_j)

The loss is ``L_policy + lambda_warm * L_warm + lambda_dice * L_dice`` with
``L_policy = -(1/J) sum_j A_j (log pi_j - mean log pi)`` (group-normalised advantages, LDVN-scaled
log-likelihoods of the detached z_j), ``L_dice`` the soft Dice of the trilinearly warped one-hot
labels (z_j carries gradient) and ``L_warm`` the warm-up objective at tau = 0 on the current state,
its KL weight set by a target-KL controller. One optimiser step per refinement step; then the best
trajectory becomes the state and the moving image is resampled once from the original.

Memory is flat in J: the encoder's outputs are held as leaf tensors; each trajectory's decoder runs
once with gradients, its hard reward is read from the detached field and its soft-Dice gradient is
accumulated into the leaves and the decoder, after which its graph is freed; the policy loss needs
only mu and sigma (latent-sized) and is back-propagated once all rewards are known; finally the
accumulated leaf gradients are pushed through the encoder in a single backward pass.

The run around it (episodes, checkpoints, resume, log) is :mod:`morphseek.train.grpo`; held-back
evaluation is :mod:`morphseek.evaluate`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from morphseek.errors import MorphSeekError
from morphseek.geometry import compose, folding_fraction, gaussian_blur, one_hot, warp, warp_labels, warp_onehot
from morphseek.losses import diffusion_regulariser, soft_dice_loss
from morphseek.metrics import LabelDice, dice_torch, foreground_labels
from morphseek.nets.policy import kl_standard_normal, ldvn_log_prob
from morphseek.train.config import LDVN_MODES, GRPOConfig

Tensor = torch.Tensor

__all__ = [
    "PairLike",
    "TargetKLController",
    "UpdateOutcome",
    "ldvn_scale",
    "group_advantages",
    "relative_log_likelihoods",
    "hard_rewards",
    "label_scorer",
    "compute_grpo_gradients",
    "grpo_update",
    "warm_objective",
    "check_pair_labels",
    "describe_pair",
]


class PairLike(Protocol):
    """What stage C needs of a pair (``morphseek.data.PairSample`` fits): tensors on the model grid."""

    moving: Tensor  # (1, 1, D, H, W) float in [0, 1]
    fixed: Tensor
    moving_labels: Tensor | None  # (1, 1, D, H, W) int64, or None for a label-free pair
    fixed_labels: Tensor | None
    label_values: Any  # labels present in both maps (sequence / tensor of ints)
    # optional: ``moving_clean`` / ``fixed_clean``, the images without noise (synthesised pairs)


#: Blur (voxels) that stands in for the noise-free images of a pair that has none (a user's pair)
#: when the warm-up compared noise-free images (docs/QUALITY.md sections 5 and 8).
CLEAN_STAND_IN_SIGMA = 1.0


def clean_targets(sample: PairLike, clean: bool) -> tuple[Tensor, Tensor] | None:
    """The (moving, fixed) images L_warm compares when ``clean`` (the warm-up compared noise-free
    images): the pair's own noise-free images when it has them (a synthesised pair), else its images
    blurred by ``CLEAN_STAND_IN_SIGMA`` (raw NCC on noisy images pays for interpolation blur, and
    would pull the model back to the sub-voxel shift it was trained out of). None when not ``clean``:
    L_warm compares the images the network sees."""
    if not clean:
        return None
    moving, fixed = getattr(sample, "moving_clean", None), getattr(sample, "fixed_clean", None)
    if moving is None or fixed is None:
        return gaussian_blur(sample.moving, CLEAN_STAND_IN_SIGMA), gaussian_blur(sample.fixed, CLEAN_STAND_IN_SIGMA)
    return moving, fixed


# ----------------------------------------------------------------------------------------------
# the pieces: LDVN, advantages, rewards, KL controller
# ----------------------------------------------------------------------------------------------
def ldvn_scale(mode: str, latent_dims: int, raw_relative: Tensor | None = None, target_std: float = 1.0) -> float:
    """The LDVN divisor s. ``sqrt``: sqrt(N); ``none``: 1; ``adaptive``: std(raw relative log pi) /
    target_std, so that the scaled relative log-likelihoods have std ``target_std`` (falls back to
    sqrt(N) when the group has no spread). s is a constant: it never carries gradient."""
    if mode == "sqrt":
        return math.sqrt(latent_dims)
    if mode == "none":
        return 1.0
    if mode == "adaptive":
        if raw_relative is None:
            raise MorphSeekError("ldvn='adaptive' needs the unscaled relative log-likelihoods")
        spread = float(raw_relative.detach().std(unbiased=False))
        return spread / target_std if spread > 1e-12 else math.sqrt(latent_dims)
    raise MorphSeekError(f"unknown LDVN mode {mode!r}; use one of {LDVN_MODES}")


def relative_log_likelihoods(
    z: Tensor, mu: Tensor, log_sigma: Tensor, tau: float, mode: str = "sqrt", target_std: float = 1.0
) -> tuple[Tensor, float]:
    """LDVN relative log-likelihoods ``log pi_j - mean_j log pi_j`` of detached samples z (J, ...)
    under N(mu, (tau sigma)^2), mu and log_sigma (1, ...) shared by the group. Returns (J,) with
    gradient to mu and log_sigma, and the scale s used."""
    z = z.detach()
    n_latent = mu[0].numel()
    group = z.shape[0]
    mu_g = mu.expand(group, *mu.shape[1:])
    ls_g = log_sigma.expand(group, *log_sigma.shape[1:])
    if mode == "adaptive":
        raw = ldvn_log_prob(z, mu_g, ls_g, tau, 1.0)
        scale = ldvn_scale(mode, n_latent, raw - raw.mean(), target_std)
        log_pi = raw / scale
    else:
        scale = ldvn_scale(mode, n_latent)
        log_pi = ldvn_log_prob(z, mu_g, ls_g, tau, scale)
    log_pi = log_pi.reshape(group)
    return log_pi - log_pi.mean(), scale


def group_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """A_j = (R_j - mean R) / (std R + eps), population std: zero mean, unit spread (all zero when
    every trajectory has the same reward)."""
    rewards = rewards.detach().to(torch.float64)
    centred = rewards - rewards.mean()
    return (centred / (rewards.std(unbiased=False) + eps)).to(torch.float32)


@torch.no_grad()
def hard_rewards(
    total: Tensor,
    moving_labels: Tensor,
    fixed_labels: Tensor,
    label_values: Tensor,
    previous_dice: Tensor,
    w_dice: float,
    w_njd: float,
    scorer=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reward of one candidate total map (1, 3, D, H, W): nearest-neighbour label warp + Dice of
    hard labels, folding fraction of the total map. Returns (reward, dice, njd) (B,), on the
    device of ``total`` (``previous_dice`` is moved there). ``scorer``: a
    :class:`morphseek.metrics.LabelDice` built once for the pair (sync-free); None checks the
    labels on every call (``metrics.dice_torch``)."""
    warped = warp_labels(moving_labels, total)
    dice = scorer(warped) if scorer is not None else dice_torch(fixed_labels, warped, label_values)
    dice = dice.to(torch.float32)
    njd = folding_fraction(total).to(torch.float32)
    previous_dice = torch.as_tensor(previous_dice, dtype=torch.float32).to(dice.device)
    return w_dice * (dice - previous_dice) + w_njd * njd, dice, njd


def label_scorer(sample: PairLike):
    """The pair's :class:`~morphseek.metrics.LabelDice` (labels checked once, on the host), or None
    for a label-free pair."""
    if not check_pair_labels(sample, required=False):
        return None
    values = foreground_labels(sample.label_values, sample.fixed_labels.device)
    return LabelDice(sample.fixed_labels, values, sample.moving_labels)


class TargetKLController:
    """Target-KL schedule for the KL weight of L_warm (a fixed-prior trust region, no ratios):
    beta grows by ``factor`` when KL > target * tolerance and shrinks when KL < target / tolerance.
    With ``target=None`` the target is set from the first KL observed (the warm-up policy's):
    ``max(auto_factor * KL_0, auto_floor)`` -- the policy may drift to twice the warm-up KL (KL per
    latent dimension, in nats) before beta rises; the floor keeps a near-zero warm-up KL from
    freezing the policy."""

    auto_factor: float = 2.0
    auto_floor: float = 0.01

    def __init__(self, beta: float, target: float | None = None, tolerance: float = 1.5, factor: float = 1.5,
                 beta_min: float = 1e-6, beta_max: float = 1.0) -> None:
        self.beta = float(beta)
        self.target = None if target is None else float(target)
        self.tolerance, self.factor = float(tolerance), float(factor)
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def update(self, kl: float) -> float:
        """Record the KL of the step just taken; returns the weight for the next step."""
        if self.target is None:
            self.target = max(self.auto_factor * float(kl), self.auto_floor)
        if kl > self.target * self.tolerance:
            self.beta = min(self.beta * self.factor, self.beta_max)
        elif kl < self.target / self.tolerance:
            self.beta = max(self.beta / self.factor, self.beta_min)
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "target": self.target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.target = None if state.get("target") is None else float(state["target"])


# ----------------------------------------------------------------------------------------------
# one update
# ----------------------------------------------------------------------------------------------
def _onehot_fixed(sample: PairLike, label_values: Tensor) -> Tensor:
    return one_hot(sample.fixed_labels, label_values)


def _soft_dice(fixed_onehot: Tensor, moving_labels: Tensor, total: Tensor, label_values: Tensor) -> Tensor:
    return soft_dice_loss(fixed_onehot, warp_onehot(moving_labels, total, label_values))


def warm_objective(
    model,
    skips: Sequence[Tensor],
    mu: Tensor,
    log_sigma: Tensor,
    moving: Tensor,
    fixed: Tensor,
    total_prev: Tensor,
    similarity: Callable[[Tensor, Tensor], Tensor],
    lambda_reg: float,
    beta_kl: float,
    targets: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """L_warm at tau = 0 on the current state: similarity of the ORIGINAL moving image resampled
    once through Phi_{t-1} o (x + u0) to the fixed image, diffusion of the step u0, beta * KL.
    ``targets``: the (moving, fixed) images the similarity compares instead (``clean_targets``: as
    the warm-up compared noise-free images with ``clean_similarity``). Returns (loss, parts, u0)."""
    step = model.decode(skips, mu)
    moving, fixed = targets if targets is not None else (moving, fixed)
    warped = warp(moving, compose(total_prev, step))
    sim = similarity(warped, fixed)
    reg = diffusion_regulariser(step)
    kl = kl_standard_normal(mu, log_sigma).mean()
    loss = sim + lambda_reg * reg + beta_kl * kl
    return loss, {"sim": sim.detach(), "reg": reg.detach(), "kl": kl.detach()}, step


@dataclass
class UpdateOutcome:
    """What one GRPO step produced: the next state's total map, the chosen trajectory, the stats."""

    total: Tensor  # (1, 3, D, H, W) detached: Phi_t = Phi_{t-1} o phi_{j*}
    best: int  # j* (-1 for a label-free pair); a 0-dim device tensor when not synchronised
    rewards: Tensor  # (J,)
    dice: Tensor  # (J,) hard Dice of each candidate (fraction)
    njd: Tensor  # (J,) folding fraction of each candidate
    stats: dict[str, float]  # 0-dim device tensors when not synchronised (``sync=False``)

    @property
    def best_dice(self) -> Tensor | None:
        """(1,) hard Dice of the kept trajectory, on the device (None for a label-free pair)."""
        if isinstance(self.best, int) and self.best < 0:
            return None
        return self.dice.gather(0, torch.as_tensor(self.best, device=self.dice.device).view(1))


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad)


def compute_grpo_gradients(
    model,
    sample: PairLike,
    total_prev: Tensor,
    previous_dice: Tensor | None,
    config: GRPOConfig,
    beta_kl: float,
    similarity: Callable[[Tensor, Tensor], Tensor],
    lambda_reg: float,
    generator: torch.Generator | None = None,
    memory_flat: bool | None = None,
    scorer=None,
    sync: bool = True,
    clean: bool = False,
) -> UpdateOutcome:
    """Accumulate the gradients of one GRPO step into ``model``'s parameters (no optimiser step).

    Every tensor is created on the pair's device and nothing is read back to the host until the
    end: the running best trajectory is kept with ``torch.where`` (flat memory, no comparison on the
    host), and the statistics are read back in one transfer when ``sync`` (else they stay 0-dim
    device tensors and ``best`` a device index: the step is then free of host synchronisation,
    which the tests check on the meta device). ``scorer``: the pair's :func:`label_scorer` (built
    here when None). Noise is drawn from ``generator`` on the CPU and moved: the same seed gives
    the same trajectories on every device.

    ``total_prev`` is Phi_{t-1} (zeros at t = 1); ``previous_dice`` its hard Dice (None: computed).
    For a label-free pair only L_warm contributes and the state advances by the deterministic step.
    ``memory_flat=False`` builds one graph over all J trajectories (the reference the memory-flat path
    is tested against); both consume the generator identically and give the same gradients.
    ``clean``: L_warm compares noise-free images, the pair's own or a blurred stand-in (``clean_targets``).
    """
    memory_flat = config.memory_flat if memory_flat is None else memory_flat
    moving, fixed = sample.moving, sample.fixed
    if moving.shape[0] != 1:
        raise MorphSeekError(f"GRPO works on one pair at a time (batch 1), got a batch of {moving.shape[0]}")
    current = warp(moving, total_prev).detach()  # I_m^{t-1} = I_m o Phi_{t-1}, resampled once
    enc = model.encode(current, fixed)
    labelled = check_pair_labels(sample, required=False)

    if memory_flat:
        skips = [_leaf(s) for s in enc.skips]
        mu, log_sigma = _leaf(enc.mu), _leaf(enc.log_sigma)
    else:
        skips, mu, log_sigma = list(enc.skips), enc.mu, enc.log_sigma

    lam_w = config.lambda_warm
    warm, warm_parts, step0 = warm_objective(model, skips, mu, log_sigma, moving, fixed, total_prev,
                                             similarity, lambda_reg, beta_kl, clean_targets(sample, clean))
    stats: dict[str, Tensor] = {f"warm_{k}": v for k, v in warm_parts.items()}
    stats["loss_warm"] = warm.detach()
    stats["kl"] = stats.pop("warm_kl")
    if memory_flat:
        (lam_w * warm).backward()  # its decoder graph is freed before the trajectories run

    device = moving.device
    if not labelled:
        if memory_flat:
            _encoder_backward(enc, skips, mu, log_sigma)
        else:
            (lam_w * warm).backward()
        total = compose(total_prev, step0.detach()).detach()
        zero = torch.zeros((), device=device)
        stats.update(loss=lam_w * warm.detach(), loss_policy=zero, loss_dice=zero, labelled=zero)
        empty = torch.zeros(0, device=device)
        return _finish(UpdateOutcome(total, -1, empty, empty, empty, stats), beta_kl, sync)

    values = foreground_labels(sample.label_values, device)
    fixed_oh = _onehot_fixed(sample, values)
    if scorer is None:
        scorer = label_scorer(sample)
    if previous_dice is None:
        with torch.no_grad():
            previous_dice = scorer(warp_labels(sample.moving_labels, total_prev))
    previous_dice = torch.as_tensor(previous_dice, dtype=torch.float32).to(device)

    J, tau = config.trajectories, config.tau
    eps = torch.randn((J, *mu.shape[1:]), generator=generator, dtype=mu.dtype, device="cpu").to(device)
    rewards = torch.zeros(J, device=device)
    dices = torch.zeros(J, device=device)
    njds = torch.zeros(J, device=device)
    z_all = []
    best = torch.zeros((), dtype=torch.long, device=device)
    best_total = None
    dice_losses = []
    for j in range(J):
        # Reparameterised (soft Dice reaches mu and sigma); exp is taken per trajectory so that each
        # trajectory's graph, freed by its own backward, owns all of its nodes.
        with torch.set_grad_enabled(config.lambda_dice > 0):  # without L_dice only the reward is needed
            z = mu + tau * torch.exp(log_sigma) * eps[j : j + 1]
            total_j = compose(total_prev, model.decode(skips, z))
        z_all.append(z.detach())
        r, d, n = hard_rewards(total_j.detach(), sample.moving_labels, sample.fixed_labels, values,
                               previous_dice, config.w_dice, config.w_njd, scorer=scorer)
        rewards[j], dices[j], njds[j] = r[0], d[0], n[0]
        # running best on the device: the first trajectory, then any with a strictly larger reward
        if best_total is None:
            best_total = total_j.detach().clone()
        else:
            better = rewards[j] > _pick(rewards, best)
            best = torch.where(better, torch.full_like(best, j), best)
            best_total = torch.where(better, total_j.detach(), best_total)
        if config.lambda_dice == 0:  # logged only
            with torch.no_grad():
                value = _soft_dice(fixed_oh, sample.moving_labels, total_j, values)
            dice_losses.append(value.detach())
            continue
        dice_j = _soft_dice(fixed_oh, sample.moving_labels, total_j, values)
        if memory_flat:
            # Free this trajectory's graph now; keep the leaves' (and mu/sigma's) gradients.
            (config.lambda_dice / J * dice_j).backward(retain_graph=False)
            dice_losses.append(dice_j.detach())
        else:
            dice_losses.append(dice_j)
        del total_j

    if config.policy:
        advantages = group_advantages(rewards).to(device)
        rel_log_pi, scale = relative_log_likelihoods(torch.cat(z_all), mu, log_sigma, tau, config.ldvn,
                                                     config.ldvn_target_std)
        policy = -(advantages * rel_log_pi).mean()
    else:  # Dice-supervised baseline: the same step without the policy term
        rel_log_pi, scale = torch.zeros(J, device=device), float("nan")
        policy = (mu * 0.0).sum()

    if memory_flat or config.lambda_dice == 0:
        dice_term = torch.stack(dice_losses).mean()
    if memory_flat:
        policy.backward()
        _encoder_backward(enc, skips, mu, log_sigma)
    else:
        if config.lambda_dice != 0:
            dice_term = torch.stack(dice_losses).mean()
            (policy + lam_w * warm + config.lambda_dice * dice_term).backward()
        else:
            (policy + lam_w * warm).backward()
    loss_dice = dice_term.detach()

    stats.update(
        loss=policy.detach() + lam_w * stats["loss_warm"] + config.lambda_dice * loss_dice,
        loss_policy=policy.detach(),
        loss_dice=loss_dice,
        labelled=torch.ones((), device=device),
        reward_mean=rewards.mean(),
        reward_std=rewards.std(unbiased=False),
        reward_best=_pick(rewards, best),
        dice_prev=previous_dice.reshape(-1)[0],
        dice_best=_pick(dices, best),
        njd_best=_pick(njds, best),
        log_pi_rel_std=rel_log_pi.detach().std(unbiased=False),
        ldvn_scale=torch.as_tensor(float(scale), device=device),
        sigma_mean=torch.exp(log_sigma.detach()).mean(),
    )
    return _finish(UpdateOutcome(best_total, best, rewards, dices, njds, stats), beta_kl, sync)


def _pick(values: Tensor, index: Tensor) -> Tensor:
    """values[index] for a 0-dim device index, without reading the index back to the host."""
    return values.gather(0, index.reshape(1))[0]


def _finish(outcome: UpdateOutcome, beta_kl: float, sync: bool) -> UpdateOutcome:
    """With ``sync``: the statistics and the kept index read back to the host in one transfer."""
    if not sync:
        outcome.stats["beta_kl"] = float(beta_kl)
        return outcome
    names = list(outcome.stats)
    best = outcome.best if isinstance(outcome.best, int) else None
    values = torch.stack([outcome.stats[k].detach().reshape(()).to(torch.float64) for k in names]
                         + ([outcome.best.to(torch.float64)] if best is None else [])).cpu().tolist()
    if best is None:
        best = int(values.pop())
    stats = dict(zip(names, values))
    stats["beta_kl"] = float(beta_kl)
    return dataclasses.replace(outcome, best=best, stats=stats)


def _encoder_backward(enc, skips: Sequence[Tensor], mu: Tensor, log_sigma: Tensor) -> None:
    """One backward pass through the encoder with the gradients accumulated in the leaves."""
    outputs, grads = [], []
    for out, leaf in zip([*enc.skips, enc.mu, enc.log_sigma], [*skips, mu, log_sigma]):
        if out.requires_grad and leaf.grad is not None:
            outputs.append(out)
            grads.append(leaf.grad)
    if outputs:
        torch.autograd.backward(outputs, grads)


def grpo_update(
    model,
    optimizer: torch.optim.Optimizer,
    sample: PairLike,
    total_prev: Tensor,
    previous_dice: Tensor | None,
    config: GRPOConfig,
    beta_kl: float,
    similarity: Callable[[Tensor, Tensor], Tensor],
    lambda_reg: float,
    generator: torch.Generator | None = None,
    scorer=None,
    clean: bool = False,
) -> UpdateOutcome:
    """One refinement step of fine-tuning: gradients (memory-flat), one optimiser step, greedy state.
    ``scorer``: the pair's :func:`label_scorer`, built once per pair by the caller (else per step).
    ``clean``: see :func:`compute_grpo_gradients`."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    outcome = compute_grpo_gradients(model, sample, total_prev, previous_dice, config, beta_kl,
                                     similarity, lambda_reg, generator, scorer=scorer, clean=clean)
    optimizer.step()
    return outcome


# ----------------------------------------------------------------------------------------------
# labels, inference, validation
# ----------------------------------------------------------------------------------------------
def check_pair_labels(sample: PairLike, required: bool = False, name: str | None = None) -> bool:
    """True when the pair carries labels usable for rewards; False for a label-free pair (unless
    ``required``). A pair with labels that share no foreground structure is rejected."""
    what = name or describe_pair(sample, "pair")
    if sample.moving_labels is None or sample.fixed_labels is None:
        if required:
            raise MorphSeekError(f"{what}: GRPO needs both label maps and this pair has none")
        return False
    values = [] if sample.label_values is None else foreground_labels(sample.label_values, "cpu").tolist()
    if not values:
        in_moving = set(torch.unique(sample.moving_labels).tolist()) - {0}
        in_fixed = set(torch.unique(sample.fixed_labels).tolist()) - {0}
        raise MorphSeekError(
            f"{what}: the moving and fixed label maps share no structure (moving labels "
            f"{sorted(in_moving)[:10]}, fixed labels {sorted(in_fixed)[:10]}); Dice rewards are "
            "undefined. Check that both segmentations use the same label ids."
        )
    return True


def describe_pair(sample, fallback: str) -> str:
    ids = [str(i) for i in getattr(sample, "pair", ()) or () if i]
    return f"{fallback} ({' -> '.join(ids)})" if ids else fallback
