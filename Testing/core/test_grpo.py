"""Stage C (GRPO with LDVN): the pieces against hand computations, the memory-flat gradients against
the all-at-once graph, and a short fine-tune on synthetic labelled pairs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from morphseek.data import PairSample
from morphseek.errors import Cancelled, MorphSeekError
from morphseek import metrics
from morphseek.geometry import gaussian_blur, warp, warp_labels
from morphseek.losses import local_ncc_loss, similarity_loss
from morphseek.nets.registry import build_model
from morphseek.runconfig import RunConfig
from morphseek.synth import make_dataset
from morphseek.train.grpo import (
    GRPOConfig,
    TargetKLController,
    check_pair_labels,
    compute_grpo_gradients,
    evaluate_pairs,
    grpo_finetune,
    group_advantages,
    relative_log_likelihoods,
    warm_similarity,
)
from morphseek.train.policy_gradient import CLEAN_STAND_IN_SIGMA
from morphseek.train.trainlog import RunLogger

torch.manual_seed(0)
GRID = (32, 32, 32)


def _sample(moving, fixed) -> PairSample:
    ml = torch.from_numpy(moving.labels.astype(np.int64))[None, None]
    fl = torch.from_numpy(fixed.labels.astype(np.int64))[None, None]
    values = sorted(set(ml.unique().tolist()) & set(fl.unique().tolist()) - {0})
    return PairSample(torch.from_numpy(moving.image)[None, None], torch.from_numpy(fixed.image)[None, None],
                      ml, fl, values, (moving.id, fixed.id))


@pytest.fixture(scope="module")
def subjects():
    return make_dataset(6, GRID, seed=3, n_labels=5, max_displacement=5.0)


@pytest.fixture(scope="module")
def lively_model():
    """A tiny model whose displacement responds to z by several voxels (so hard-label rewards differ
    between trajectories and the policy term is exercised)."""
    torch.manual_seed(1)
    model = build_model({"backbone": "tiny"})
    with torch.no_grad():  # an untrained decoder barely responds to z: amplify the latent's path
        model.backbone.flow.weight.normal_(0.0, 0.3)
        model.backbone.up_convs[0][0].weight.mul_(300.0)
    return model


# ------------------------------------------------------------------------------------ LDVN
def test_warm_objective_keeps_the_warm_up_runs_similarity_window_and_presmoothing():
    """GRPO's L_warm is the warm-up's own L_sim: a presmoothed warm-up (docs/QUALITY.md section 1)
    must not be fine-tuned against raw NCC, which rewards interpolation blur again."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand((1, 1, 12, 12, 12), generator=g), torch.rand((1, 1, 12, 12, 12), generator=g)
    raw = float(local_ncc_loss(a, b, window=5))
    smoothed = float(local_ncc_loss(gaussian_blur(a, 1.0), gaussian_blur(b, 1.0), window=5))
    assert abs(raw - smoothed) > 0.05  # noise images: blur changes NCC a lot, so the cases below differ
    saved = {"similarity": "ncc", "window": 5, "presmooth": 1.0}  # as a warm-up checkpoint stores it
    run = RunConfig.from_dict(saved)
    assert float(warm_similarity(GRPOConfig(), run)(a, b)) == pytest.approx(smoothed, abs=1e-6)
    assert float(warm_similarity(GRPOConfig(), RunConfig.from_dict({**saved, "presmooth": 0.0}))(a, b)) == pytest.approx(raw, abs=1e-6)
    assert float(warm_similarity(GRPOConfig(), RunConfig.from_dict({"similarity": "ncc", "window": 5}))(a, b)) == pytest.approx(raw, abs=1e-6)
    # an explicit similarity replaces the warm-up's, presmoothing included
    assert float(warm_similarity(GRPOConfig(similarity="mse"), run)(a, b)) == pytest.approx(float(torch.mean((a - b) ** 2)), abs=1e-6)


def test_warm_objective_compares_the_noise_free_images_when_the_warm_up_did(subjects, lively_model):
    """A warm-up trained with clean_similarity compared the synthesised pairs' noise-free images
    (docs/QUALITY.md section 8); GRPO's L_warm must do the same on pairs that carry them, compare
    blurred images on pairs that do not (a user's: raw NCC would reward interpolation blur), and
    the images the network sees when the warm-up did neither."""
    sample = _sample(subjects[0], subjects[1])
    g = torch.Generator().manual_seed(4)
    noisy = PairSample(sample.moving + 0.2 * torch.rand(sample.moving.shape, generator=g),
                       sample.fixed + 0.2 * torch.rand(sample.fixed.shape, generator=g),
                       sample.moving_labels, sample.fixed_labels, sample.label_values, sample.pair,
                       moving_clean=sample.moving, fixed_clean=sample.fixed)
    no_clean = PairSample(noisy.moving, noisy.fixed, noisy.moving_labels, noisy.fixed_labels, noisy.label_values)
    config = GRPOConfig(trajectories=2, steps=1)
    similarity = similarity_loss("ncc", window=5)

    def warm_sim(pair, clean):
        lively_model.zero_grad(set_to_none=True)
        out = compute_grpo_gradients(lively_model, pair, torch.zeros((1, 3, *GRID)), None, config, 1e-3,
                                     similarity, 1.0, torch.Generator().manual_seed(0), clean=clean)
        return float(out.stats["warm_sim"])

    on_noisy, on_clean = warm_sim(noisy, False), warm_sim(noisy, True)
    assert abs(on_noisy - on_clean) > 0.05  # the noise changes NCC a lot: the cases below differ
    # the step is the network's on the NOISY images either way; only what L_sim compares changes
    with torch.no_grad():
        enc = lively_model.encode(noisy.moving, noisy.fixed)
        step = lively_model.decode(enc.skips, enc.mu)
    assert on_clean == pytest.approx(float(similarity(warp(sample.moving, step), sample.fixed)), abs=1e-5)
    assert on_noisy == pytest.approx(float(similarity(warp(noisy.moving, step), noisy.fixed)), abs=1e-5)
    # a user's pair has no noise-free images: its images blurred by 1 voxel stand in for them
    blurred = [gaussian_blur(t, CLEAN_STAND_IN_SIGMA) for t in (noisy.moving, noisy.fixed)]
    stand_in = float(similarity(warp(blurred[0], step), blurred[1]))
    assert abs(stand_in - on_noisy) > 0.05
    assert warm_sim(no_clean, True) == pytest.approx(stand_in, abs=1e-5)
    assert warm_sim(no_clean, False) == pytest.approx(on_noisy, abs=1e-6)
    assert RunConfig.from_dict({"clean_similarity": True}).clean_similarity is True
    assert RunConfig().clean_similarity is False
    with pytest.raises(MorphSeekError, match="clean_similarity"):
        RunConfig.from_dict({"clean_similarity": "yes"}, "checkpoint X")


def test_ldvn_keeps_order_and_only_rescales_relative_values():
    torch.manual_seed(2)
    J, shape, tau = 6, (1, 4, 3, 3, 2), 0.3
    mu, log_sigma = torch.randn(shape), 0.3 * torch.randn(shape)
    z = mu + tau * torch.exp(log_sigma) * torch.randn((J, *shape[1:]))
    n = mu[0].numel()

    exact, s_none = relative_log_likelihoods(z, mu, log_sigma, tau, "none")
    # Cross-check the unscaled value against torch.distributions (sum of per-dimension log-densities).
    log_density = torch.distributions.Normal(mu, tau * torch.exp(log_sigma)).log_prob(z).flatten(1).sum(1)
    torch.testing.assert_close(exact, log_density - log_density.mean(), rtol=1e-5, atol=1e-4)
    assert s_none == 1.0

    scaled, s_sqrt = relative_log_likelihoods(z, mu, log_sigma, tau, "sqrt")
    assert s_sqrt == pytest.approx(math.sqrt(n))
    torch.testing.assert_close(scaled * math.sqrt(n), exact, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.argsort(scaled), torch.argsort(exact))  # order kept
    assert abs(float(scaled.mean())) < 1e-5  # still relative

    adaptive, s_adapt = relative_log_likelihoods(z, mu, log_sigma, tau, "adaptive", target_std=0.7)
    assert float(adaptive.std(unbiased=False)) == pytest.approx(0.7, rel=1e-4)
    assert torch.equal(torch.argsort(adaptive), torch.argsort(exact))
    torch.testing.assert_close(adaptive * s_adapt, exact, rtol=1e-5, atol=1e-4)


def test_ldvn_gradient_is_the_exact_gradient_divided_by_s():
    torch.manual_seed(3)
    shape, tau = (1, 2, 4, 4, 4), 0.5
    mu = torch.randn(shape, requires_grad=True)
    log_sigma = (0.2 * torch.randn(shape)).requires_grad_()
    z = (mu + tau * torch.exp(log_sigma) * torch.randn((4, *shape[1:]))).detach()
    weights = torch.tensor([1.0, -0.5, 0.25, -0.75])
    grads = {}
    for mode in ("none", "sqrt"):
        rel, _ = relative_log_likelihoods(z, mu, log_sigma, tau, mode)
        grads[mode] = torch.autograd.grad((weights * rel).sum(), (mu, log_sigma))
    s = math.sqrt(mu[0].numel())
    for exact, scaled in zip(grads["none"], grads["sqrt"]):
        torch.testing.assert_close(scaled * s, exact, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ advantages
def test_advantages_are_zero_mean_unit_spread_and_ordered():
    rewards = torch.tensor([0.02, -0.01, 0.05, 0.0, 0.011, -0.3])
    a = group_advantages(rewards)
    assert float(a.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(a.std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(torch.argsort(a), torch.argsort(rewards))
    # hand computation of one entry
    r = rewards.double()
    assert float(a[2]) == pytest.approx(float((r[2] - r.mean()) / r.std(unbiased=False)), rel=1e-5)
    assert torch.equal(group_advantages(torch.full((4,), 0.3)), torch.zeros(4))  # no spread: no push


def test_target_kl_controller_raises_and_lowers_beta():
    c = TargetKLController(beta=1e-3, target=0.1, tolerance=1.5, factor=2.0)
    assert c.update(0.2) == pytest.approx(2e-3)  # above target * 1.5
    assert c.update(0.1) == pytest.approx(2e-3)  # inside the band
    assert c.update(0.01) == pytest.approx(1e-3)  # below target / 1.5
    auto = TargetKLController(beta=1e-3)
    auto.update(0.02)
    assert auto.target == pytest.approx(0.04)  # 2 x the warm-up policy's KL
    state = auto.state_dict()
    other = TargetKLController(beta=5.0)
    other.load_state_dict(state)
    assert other.beta == auto.beta and other.target == auto.target


# ----------------------------------------------------------------- memory-flat == all-at-once
def _gradients(model, sample, memory_flat, config):
    model.zero_grad(set_to_none=True)
    total = torch.zeros((1, 3, *GRID))
    outcome = compute_grpo_gradients(model, sample, total, None, config, beta_kl=1e-2,
                                     similarity=similarity_loss("mse"), lambda_reg=0.02,
                                     generator=torch.Generator().manual_seed(7), memory_flat=memory_flat)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, outcome


def test_one_at_a_time_gradients_equal_the_all_at_once_gradients(subjects, lively_model):
    sample = _sample(subjects[0], subjects[1])
    config = GRPOConfig(trajectories=3, tau=1.0, lambda_warm=1.0, lambda_dice=1.0)
    flat, out_flat = _gradients(lively_model, sample, True, config)
    whole, out_whole = _gradients(lively_model, sample, False, config)
    assert torch.equal(out_flat.rewards, out_whole.rewards) and out_flat.best == out_whole.best
    assert float(out_flat.rewards.std()) > 0, "rewards must differ so that the policy term is tested"
    assert out_flat.stats["loss_policy"] != 0.0
    assert set(flat) == set(whole)
    encoder = [n for n in flat if n.startswith("backbone.encoder")]
    head = [n for n in flat if n.startswith("head.")]
    assert encoder and head
    for name in flat:
        scale = float(whole[name].abs().max())
        assert scale > 0, f"no gradient reached {name}"
        torch.testing.assert_close(flat[name], whole[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    # The greedy state is the best candidate's total map.
    torch.testing.assert_close(out_flat.total, out_whole.total)


def test_label_free_pair_contributes_only_through_the_warm_up_term(subjects, lively_model):
    labelled = _sample(subjects[0], subjects[1])
    free = PairSample(labelled.moving, labelled.fixed, None, None, [], ("a", "b"))
    assert check_pair_labels(free) is False
    config = GRPOConfig(trajectories=3, tau=1.0)
    grads, outcome = _gradients(lively_model, free, True, config)
    assert outcome.best == -1 and outcome.stats["loss_policy"] == 0.0 and outcome.stats["loss_dice"] == 0.0
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    whole, _ = _gradients(lively_model, free, False, config)
    for name in grads:
        torch.testing.assert_close(grads[name], whole[name], rtol=1e-4, atol=1e-7)


def test_pair_whose_labels_share_no_structure_is_rejected(subjects):
    s = _sample(subjects[0], subjects[1])
    disjoint = PairSample(s.moving, s.fixed, s.moving_labels, s.fixed_labels + 100, [], ("m01", "f02"))
    with pytest.raises(MorphSeekError, match="share no structure"):
        check_pair_labels(disjoint)
    with pytest.raises(MorphSeekError, match="m01 -> f02"):
        grpo_finetune(build_model({"backbone": "tiny"}), [disjoint], [], GRPOConfig(episodes=1))


# ---------------------------------------------------------------------- a short fine-tune
def _warm_up(model, pairs, iterations, lr=3e-3):
    from morphseek.train.warmup import warmup_loss

    sim = similarity_loss("mse")
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for i in range(iterations):
        s = pairs[i % len(pairs)]
        loss, _ = warmup_loss(model, s.moving, s.fixed, sim, 0.02, 1e-3)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model


@pytest.mark.slow
def test_short_finetune_raises_held_back_dice_without_folding(subjects, tmp_path):
    torch.manual_seed(4)
    train = [_sample(subjects[i], subjects[j]) for i, j in itertools.permutations(range(4), 2)]
    val = [_sample(subjects[i], subjects[j]) for i, j in itertools.permutations(range(4, 6), 2)]
    model = _warm_up(build_model({"backbone": "tiny"}), train, iterations=24, lr=5e-3)
    before = evaluate_pairs(model, val, steps=2)
    config = GRPOConfig(steps=2, trajectories=3, tau=0.5, learning_rate=1e-3, episodes=4, validate_every=4)
    rows = []
    progress = []
    result = grpo_finetune(model, train, val, config, out=tmp_path / "ft.ckpt", log=tmp_path / "ft",
                           progress=lambda done, total, row: (progress.append((done, total)), rows.append(row)),
                           run_config=RunConfig(lambda_reg=0.02, grid=tuple(GRID)))
    after = result.validation
    assert result.done == 4 and result.optimizer_steps == 8 and result.model is model
    assert progress == [(e, 4) for e in (1, 1, 2, 2, 3, 3, 4, 4)]  # episodes done, per row
    assert result.last == rows[-1] and result.history == rows
    # Stated bound: held-back Dice rises by at least 0.5 points; NJD% rises by at most 0.5 points.
    assert after["val_dice"] > before["val_dice"] + 0.5, (before, after)
    assert after["val_njd"] <= before["val_njd"] + 0.5, (before, after)
    # The log has one row per optimiser step with every item a person needs to follow the run.
    logged = RunLogger(tmp_path / "ft", append=True).rows()
    assert len(logged) == len(rows) == 8
    for key in ("reward_mean", "reward_std", "kl", "beta_kl", "loss_policy", "loss_warm", "loss_dice", "loss"):
        assert all(key in row for row in logged), key
    assert logged[-1]["val_dice"] == pytest.approx(after["val_dice"])
    assert (tmp_path / "ft.csv").read_text().splitlines()[0].startswith("episode,")


def _with_fine_grid(sample: PairSample) -> PairSample:
    """``sample`` (32^3) as the fine grid of a pair on a 16^3 model grid whose voxels are 2x2x2
    blocks of it (the model grid's images their block means, its labels every other voxel)."""
    pool = lambda t: torch.nn.functional.avg_pool3d(t, 2)  # noqa: E731
    every_other = lambda t: t[..., ::2, ::2, ::2].contiguous()  # noqa: E731
    return PairSample(pool(sample.moving), pool(sample.fixed), every_other(sample.moving_labels),
                      every_other(sample.fixed_labels), list(sample.label_values), sample.pair,
                      fine=sample, to_fine=([0.5] * 3, [-0.25] * 3))


def test_fine_steps_run_the_last_steps_on_the_pairs_fine_grid(subjects, lively_model, monkeypatch):
    """``fine_steps``: the episode's last steps run on the pair's fine grid, as registration runs them,
    starting from the map so far moved there (``PairSample.map_to_fine``), with Dice taken there anew;
    validation follows the same schedule."""
    import morphseek.train.grpo as grpo_module
    from morphseek.geometry import regrid

    pair = _with_fine_grid(_sample(subjects[0], subjects[1]))
    seen = []
    original = grpo_module.grpo_update

    def recording(model, optimizer, sample, total, previous_dice, *args, **kwargs):
        outcome = original(model, optimizer, sample, total, previous_dice, *args, **kwargs)
        seen.append((tuple(sample.moving.shape[2:]), total.clone(), previous_dice, outcome.total.clone()))
        return outcome

    monkeypatch.setattr(grpo_module, "grpo_update", recording)
    model = build_model({"backbone": "tiny"})
    model.load_state_dict(lively_model.state_dict())
    config = GRPOConfig(steps=3, fine_steps=1, trajectories=2, episodes=1)
    result = grpo_finetune(model, [pair], [pair], config)
    assert [shape for shape, *_ in seen] == [(16, 16, 16), (16, 16, 16), (32, 32, 32)]
    assert seen[1][2] is not None and seen[2][2] is None  # Dice of step 2, then taken anew on the fine grid
    torch.testing.assert_close(seen[2][1], regrid(seen[1][3], (32, 32, 32), [0.5] * 3, [-0.25] * 3))
    assert float(seen[1][3].abs().max()) > 0.1  # a map that moved, so the comparison above means something
    # validation: two steps on the model grid, the third on the fine grid (Dice on its labels)
    expected = evaluate_pairs(model, [pair], steps=3, fine_steps=1)
    assert result.validation["val_dice"] == pytest.approx(expected["val_dice"])
    coarse_total = refine_steps(model, pair, 2)
    fine_total = refine_steps(model, pair.fine, 1, initial=pair.map_to_fine(coarse_total))
    dice = metrics.dice_torch(pair.fine.fixed_labels, warp_labels(pair.fine.moving_labels, fine_total),
                              metrics.foreground_labels(pair.label_values, "cpu"))[0]
    assert expected["val_dice"] == pytest.approx(100.0 * float(dice))
    assert expected["val_dice"] != pytest.approx(evaluate_pairs(model, [pair], steps=3)["val_dice"])


def refine_steps(model, sample, steps, initial=None):
    from morphseek.register import refine
    model.eval()
    return refine(model, sample.moving, sample.fixed, steps=steps, initial=initial)[-1].total


def test_fine_steps_need_every_pair_on_its_fine_grid(subjects):
    model = build_model({"backbone": "tiny"})
    pair = _sample(subjects[0], subjects[1])
    with pytest.raises(MorphSeekError, match=r"pair \('.*'\): fine steps need the pair prepared on the fine grid"):
        grpo_finetune(model, [_with_fine_grid(pair)], [pair], GRPOConfig(steps=2, fine_steps=1, trajectories=2))
    with pytest.raises(MorphSeekError, match="fine_steps must be from 0 to steps"):
        GRPOConfig(steps=2, fine_steps=3).check()


def test_cancel_keeps_the_last_checkpoint_and_resume_continues(subjects, tmp_path):
    torch.manual_seed(5)
    train = [_sample(subjects[0], subjects[1]), _sample(subjects[2], subjects[3])]
    model = build_model({"backbone": "tiny"})
    config = GRPOConfig(steps=1, trajectories=2, episodes=3)
    out, log = tmp_path / "ft.ckpt", tmp_path / "ft"
    calls = {"n": 0}

    def cancel_after_two_steps():  # polled before each optimiser step
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        grpo_finetune(model, train, [], config, out=out, log=log, cancel=cancel_after_two_steps)
    assert calls["n"] == 3  # no step ran after the cancel
    assert [row["episode"] for row in RunLogger(log, append=True).rows()] == [0, 1]
    from morphseek.checkpoint import checkpoint_files, load_checkpoint

    saved, run_config, extra = load_checkpoint(out)
    assert extra["state"]["grpo"]["episode"] == 2 and run_config.stage == "finetune"
    for name, tensor in saved.state_dict().items():  # the checkpoint is the model after episode 2
        torch.testing.assert_close(tensor, model.state_dict()[name])

    resumed = grpo_finetune(saved, train, [], config, out=out, log=log, resume=True)
    assert resumed.done == 3 and resumed.optimizer_steps == 3 and resumed.checkpoint == checkpoint_files(out)[0]
    assert [row["episode"] for row in RunLogger(log, append=True).rows()] == [0, 1, 2]


def test_fine_tuning_reports_the_held_back_evaluation_it_started_from(subjects, lively_model, tmp_path):
    # the model as it came is evaluated on the held-back pairs before the first episode: what the
    # fine-tuned model is judged against (CLI, worker and panel); a resumed run keeps that figure
    import copy
    import dataclasses

    from morphseek.checkpoint import load_checkpoint

    model = copy.deepcopy(lively_model)
    train, val = [_sample(subjects[0], subjects[1])], [_sample(subjects[2], subjects[3])]
    expected = evaluate_pairs(model, val, steps=2)
    config = GRPOConfig(steps=2, trajectories=2, episodes=2, learning_rate=1e-2)
    out = tmp_path / "ft"
    result = grpo_finetune(model, train, val, config, out=out)
    assert result.validation_start == pytest.approx(expected) and expected["val_pairs"] == 1
    assert result.validation["val_dice"] != pytest.approx(expected["val_dice"])  # the model moved
    assert result.held_back_fell == (result.validation["val_dice"] < expected["val_dice"])
    saved, _, _ = load_checkpoint(out)
    resumed = grpo_finetune(saved, train, val, dataclasses.replace(config, episodes=3), out=out, resume=True)
    assert resumed.done == 3 and resumed.validation_start == pytest.approx(expected)
    # resumed on other held-back pairs, the first figure is no longer comparable: none
    saved, _, _ = load_checkpoint(out)
    other = grpo_finetune(saved, train, val * 2, dataclasses.replace(config, episodes=4), out=out, resume=True)
    assert other.validation_start == {} and not other.held_back_fell
    assert not grpo_finetune(copy.deepcopy(lively_model), train, [], config).validation_start  # none to evaluate


def test_held_back_fell_compares_the_end_with_the_start():
    from morphseek.train.contract import TrainResult

    def result(start, end):
        return TrainResult(None, None, 1, 1, validation={} if end is None else {"val_dice": end},
                           validation_start={} if start is None else {"val_dice": start})

    assert result(71.8, 70.6).held_back_fell and not result(71.8, 72.4).held_back_fell
    assert not result(71.8, 71.8).held_back_fell and not result(None, 70.0).held_back_fell
    assert not result(71.8, None).held_back_fell


def test_head_only_fine_tuning_moves_the_policy_head_alone(subjects, lively_model):
    import copy

    model = copy.deepcopy(lively_model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    train = [_sample(subjects[0], subjects[1])]
    grpo_finetune(model, train, [], GRPOConfig(steps=2, trajectories=3, episodes=2, learning_rate=1e-2,
                                               trainable="head"))
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(name.startswith("head.mu_conv.") or name.startswith("head.log_sigma_conv.")
                           for name in changed), changed
    assert all(p.requires_grad for p in model.parameters())  # the frozen weights are handed back trainable
    with pytest.raises(MorphSeekError, match="trainable must be one of"):
        GRPOConfig(trainable="decoder").check()
    with pytest.raises(MorphSeekError, match="lambda_reg must be >= 0"):
        GRPOConfig(lambda_reg=-1.0).check()
    GRPOConfig(lambda_reg=0.0).check()  # no diffusion term is allowed, as in the warm-up
