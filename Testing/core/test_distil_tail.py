"""scripts/distil_tail.py: the narrower tail it trains is the one registration runs (docs/QUALITY.md section 25)."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from morphseek.nets.registry import build_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "distil_tail.py"
spec = importlib.util.spec_from_file_location("distil_tail", SCRIPT)
distil_tail = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distil_tail)

CONFIG = {"backbone": "voxelmorph", "enc_channels": [4, 8, 8], "dec_channels": [8, 8, 8, 6, 6]}


def test_the_student_keeps_every_weight_but_the_tail_and_trains_only_the_tail():
    torch.manual_seed(0)
    teacher = build_model(CONFIG)
    student = distil_tail.student_of(teacher, [3])
    assert student.backbone.dec_channels == [8, 8, 8, 3]
    theirs = teacher.state_dict()
    tail = distil_tail.TAIL
    for name, value in student.state_dict().items():
        if not name.startswith(tail):
            assert torch.equal(value, theirs[name]), name
    trained = {name for name, q in student.named_parameters() if q.requires_grad}
    assert trained and all(name.startswith(tail) for name in trained)


def test_the_training_path_tail_equals_the_registration_path_tail():
    """The tail the script fits (with gradients) must be the one registration runs without them:
    the same features and pair give the same step."""
    torch.manual_seed(1)
    backbone = build_model(CONFIG).backbone.eval()
    moving, fixed = torch.rand(1, 1, 16, 24, 16), torch.rand(1, 1, 16, 24, 16)
    with torch.no_grad():
        skips, top = backbone.encode(moving, fixed)
        x = backbone.half_resolution_features(skips, top)
        registered = backbone.full_resolution_tail(x, skips[0])
        assert torch.allclose(registered, backbone.decode(skips, top), atol=1e-6)
    trained = distil_tail.tail(backbone, x, skips[0])
    assert trained.requires_grad and torch.allclose(trained, registered, atol=1e-5)


def test_crops_cut_the_features_and_the_full_resolution_tensors_at_matching_places():
    x = torch.arange(40 * 30 * 28, dtype=torch.float16).reshape(1, 1, 40, 30, 28)
    full = torch.arange(80 * 60 * 56, dtype=torch.float16).reshape(1, 1, 80, 60, 56)
    up = torch.nn.functional.interpolate(x.float(), scale_factor=2, mode="nearest").half()
    fx, fpair, fup = distil_tail.crop((x, full, up), np.random.default_rng(3))
    n = distil_tail.CROP
    assert fx.shape[2:] == (n, n, n) and fpair.shape[2:] == fup.shape[2:] == (2 * n, 2 * n, 2 * n)
    assert fx.dtype == torch.float32
    # the crop of the upsampled features is the upsampling of the crop of the features
    assert torch.equal(torch.nn.functional.interpolate(fx, scale_factor=2, mode="nearest"), fup)


def test_a_batch_takes_one_crop_size_that_fits_every_record_it_drew():
    small = (torch.zeros(1, 32, 16, 20, 16), torch.zeros(1, 2, 32, 40, 32), torch.zeros(1, 3, 32, 40, 32))
    large = (torch.zeros(1, 32, 40, 40, 40), torch.zeros(1, 2, 80, 80, 80), torch.zeros(1, 3, 80, 80, 80))
    x, pair, flow = distil_tail.batch_of([small, large], np.random.default_rng(0), 6)
    assert x.shape[0] == 6 and pair.shape[0] == 6 and flow.shape[0] == 6
    assert x.shape[2:] in ((16, 16, 16), (distil_tail.CROP,) * 3)
    assert pair.shape[2:] == tuple(2 * n for n in x.shape[2:])
