"""Device discipline without a GPU: the GRPO step on PyTorch's meta device (tensors with shapes but
no data), where any host read-back (``.item()``, ``float()``, ``bool()``, bincount, boolean indexing)
raises and any mix with a CPU tensor raises a device mismatch, as CUDA would. The CUDA crash of
issue 9 (``previous_dice`` sliced from a CPU tensor and subtracted from a device one at the second
step) fails the second call below; so would any new host synchronisation in the step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from morphseek import geometry
from morphseek.losses import similarity_loss
from morphseek.metrics import LabelDice, dice_torch
from morphseek.nets.registry import build_model
from morphseek.register import refine
from morphseek.train.grpo import GRPOConfig, compute_grpo_gradients

SHAPE = (16, 16, 16)


def _meta_pair():
    meta = torch.device("meta")
    return SimpleNamespace(
        moving=torch.empty(1, 1, *SHAPE, device=meta), fixed=torch.empty(1, 1, *SHAPE, device=meta),
        moving_labels=torch.empty(1, 1, *SHAPE, dtype=torch.long, device=meta),
        fixed_labels=torch.empty(1, 1, *SHAPE, dtype=torch.long, device=meta), label_values=[1, 2, 3])


@pytest.mark.parametrize("memory_flat", [True, False])
def test_grpo_steps_run_on_the_meta_device_without_host_reads(memory_flat):
    torch.manual_seed(0)
    model = build_model({"backbone": "tiny"}).to("meta")
    sample = _meta_pair()
    scorer = LabelDice(sample.fixed_labels, [1, 2, 3], width=4)  # checked "on the host" by the caller
    config = GRPOConfig(trajectories=3, memory_flat=memory_flat)
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros(1, 3, *SHAPE, device="meta")
    first = compute_grpo_gradients(model, sample, total, None, config, 1e-3, similarity_loss("mse"), 1.0,
                                   generator, scorer=scorer, sync=False)
    # the second step takes the first one's Dice as its baseline, exactly as grpo_finetune does
    second = compute_grpo_gradients(model, sample, first.total, first.best_dice, config, 1e-3,
                                    similarity_loss("mse"), 1.0, generator, scorer=scorer, sync=False)
    for outcome in (first, second):
        assert outcome.total.device.type == "meta" and outcome.total.shape == (1, 3, *SHAPE)
        assert {outcome.rewards.device.type, outcome.dice.device.type, outcome.njd.device.type} == {"meta"}
        assert all(v.device.type == "meta" for k, v in outcome.stats.items() if torch.is_tensor(v))
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters() if p.requires_grad)


def test_a_cpu_baseline_against_device_rewards_is_caught():
    # what the old code did: rewards on the device, the previous Dice kept in a CPU tensor
    from morphseek.train.grpo import hard_rewards

    sample = _meta_pair()
    cpu_dice = torch.zeros(3)[0:1]
    # hard_rewards moves the baseline to the rewards' device, so this works...
    reward, _, _ = hard_rewards(torch.zeros(1, 3, *SHAPE, device="meta"), sample.moving_labels, sample.fixed_labels,
                                torch.tensor([1, 2, 3], device="meta"), cpu_dice, 1.0, -10.0,
                                scorer=LabelDice(sample.fixed_labels, [1, 2, 3], width=4))
    assert reward.device.type == "meta"
    # ...while the subtraction the old code did is an error on a device, as the meta device shows
    with pytest.raises((RuntimeError, NotImplementedError)):
        _ = torch.zeros(1, device="meta") - cpu_dice


def test_label_dice_equals_dice_torch_and_checks_once():
    generator = torch.Generator().manual_seed(1)
    fixed = torch.randint(0, 5, (1, 1, 12, 10, 8), generator=generator)
    moving = torch.randint(0, 5, (1, 1, 12, 10, 8), generator=generator)
    warped = torch.cat([moving, fixed, torch.zeros_like(moving)])
    scorer = LabelDice(fixed, [1, 2, 4], moving)
    expected = dice_torch(fixed.expand(3, -1, -1, -1, -1), warped, [1, 2, 4])
    torch.testing.assert_close(scorer(warped), expected, rtol=0, atol=1e-6)
    assert scorer(fixed)[0] == 1.0
    assert scorer(warped).dtype == torch.float32  # no float64: usable on MPS


def test_refine_batched_candidates_equal_one_at_a_time_and_single_candidate_is_not_scored():
    torch.manual_seed(0)
    model = build_model({"backbone": "tiny"}).eval()
    moving, fixed = torch.rand(1, 1, *SHAPE), torch.rand(1, 1, *SHAPE)
    labels_m = (moving > 0.5).long() + (moving > 0.8).long()
    labels_f = (fixed > 0.5).long() + (fixed > 0.8).long()
    runs = [refine(model, moving, fixed, steps=2, trajectories=4, tau=0.5, moving_labels=labels_m,
                   fixed_labels=labels_f, label_values=[1, 2], generator=torch.Generator().manual_seed(3),
                   batch=batch) for batch in (1, 4)]
    for one, batched in zip(*runs):
        assert one.kept == batched.kept
        torch.testing.assert_close(one.total, batched.total, rtol=1e-4, atol=1e-5)
        for a, b in zip(one.candidates, batched.candidates):
            assert a.reward == pytest.approx(b.reward, abs=1e-5)
    single = refine(model, moving, fixed, steps=2, trajectories=1)
    assert all(len(s.candidates) == 1 and s.kept == 0 for s in single)
    assert single[0].candidates[0].reward != single[0].candidates[0].reward  # nan: not scored
    # deterministic steps equal decoding the mean latent by hand
    enc = model.encode(moving, fixed)
    expected = geometry.compose(torch.zeros(1, 3, *SHAPE), model.decode(enc.skips, enc.mu))
    torch.testing.assert_close(single[0].total, expected)


# --------------------------------------------------------------------------------------------------
# On the --device given to pytest (CPU by default; `--device cuda` on a GPU machine)
# --------------------------------------------------------------------------------------------------
def _blobs(device, shape=(32, 32, 32)):
    k, j, i = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    c = [n / 2 for n in shape]

    def blob(dz, dy):
        return torch.exp(-((k - c[0] - dz) ** 2 + (j - c[1] - dy) ** 2 + (i - c[2]) ** 2) / 40.0)

    fixed, moving = blob(0.0, 0.0), blob(2.5, -1.5)
    labels = lambda image: ((image > 0.3).long() + (image > 0.7).long())[None, None]  # noqa: E731
    return (moving[None, None].to(device), fixed[None, None].to(device), labels(moving).to(device),
            labels(fixed).to(device))


def test_grpo_two_steps_on_the_device(device):
    from morphseek.train.grpo import grpo_update

    torch.manual_seed(0)
    model = build_model({"backbone": "tiny"}).to(device)
    moving, fixed, labels_m, labels_f = _blobs(device)
    sample = SimpleNamespace(moving=moving, fixed=fixed, moving_labels=labels_m, fixed_labels=labels_f,
                             label_values=[1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    config = GRPOConfig(trajectories=3)
    total, previous = torch.zeros(1, 3, *moving.shape[2:], device=device), None
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step is where the CUDA crash happened
        outcome = grpo_update(model, optimizer, sample, total, previous, config, 1e-3, similarity_loss("mse"),
                              1.0, generator)
        assert outcome.total.device == torch.device(device) and outcome.dice.device == torch.device(device)
        total, previous = outcome.total, outcome.dice[outcome.best:outcome.best + 1]
        assert isinstance(outcome.best, int) and all(isinstance(v, float) for v in outcome.stats.values())


def test_refine_on_the_device_agrees_with_the_cpu(device):
    torch.manual_seed(0)
    model = build_model({"backbone": "tiny"}).eval()
    moving, fixed, labels_m, labels_f = _blobs("cpu")
    kwargs = dict(steps=2, trajectories=3, tau=0.5, label_values=[1, 2])
    on_cpu = refine(model, moving, fixed, moving_labels=labels_m, fixed_labels=labels_f,
                    generator=torch.Generator().manual_seed(5), **kwargs)
    model_dev = build_model({"backbone": "tiny"}).eval()
    model_dev.load_state_dict(model.state_dict())
    model_dev = model_dev.to(device)
    on_dev = refine(model_dev, moving.to(device), fixed.to(device), moving_labels=labels_m.to(device),
                    fixed_labels=labels_f.to(device), generator=torch.Generator().manual_seed(5), **kwargs)
    for a, b in zip(on_cpu, on_dev):
        assert a.kept == b.kept  # the same candidates were drawn (CPU generator) and ranked alike
        torch.testing.assert_close(b.total.cpu(), a.total, rtol=1e-3, atol=1e-3)
