#!/usr/bin/env python
"""Seconds of the export's per-step work at full resolution, each fast path against the general one.

    python benchmarks/export_speed.py        # after register_vs_ants.py prepared its 1 mm pairs

On a 160x192x224 brain at 1 mm (``benchmarks/register_vs_ants.py --work``) with an affine
pre-alignment, for the two kinds of model grid the shipped models use (``io.model_grid``: the fixed
image's axes, corners on its corner voxels; ``io.model_grid_at``: 4 mm in the brain model's LIA axes,
corners anywhere), best of 3 runs each:

- the physical field on the fixed grid (``FieldExporter.field``): separable upsampling against
  grid_sample at every fixed voxel (the general path, still used for oblique model grids);
- the label warp for each step's Dice (``FieldExporter.warp``): voxels read by index against
  grid_sample's nearest neighbour;

and checks that each fast path gives the general one's values (largest field difference in mm, label
voxels that differ).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import SimpleITK as sitk
import torch

from morphseek import export, io
from morphseek.export import _index_planes, _mix, _sample

ROOT = Path(__file__).resolve().parents[1]
LIA = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0]  # the brain model's axes (Resources/Models)


def best_of(function, repeats: int = 3) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - start)
    return best, value


def grid_sample_labels(source: export.Source, field: torch.Tensor, size_xyz) -> torch.Tensor:
    """The label warp as it was: grid_sample nearest at the stacked points, background outside."""
    planes = _index_planes(size_xyz, 0, field.shape[1], source.matrix, source.offset, torch.device("cpu"),
                           torch.float32)
    points = torch.stack(_mix(planes, field, source.field_to_grid_np.T), dim=-1)
    inside = ((points >= source.low) & (points < source.high)).all(dim=-1)
    return _sample(source.volume, points, "nearest", "border")[0].masked_fill_(~inside, source.background)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "data" / "register_vs_ants")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fixed = io.read_image(args.work / "sub01_1mm.nii.gz")
    labels = io.read_labels(args.work / "sub02_1mm_seg.nii.gz")
    prealign = sitk.AffineTransform(3)
    prealign.SetMatrix([1.02, 0.01, 0.0, 0.0, 0.98, 0.02, 0.0, 0.0, 1.0])
    prealign.SetTranslation((1.0, 2.0, 3.0))
    generator = torch.Generator().manual_seed(0)
    for name, model_ref in (("model grid 48^3 in the image's axes", io.model_grid(fixed, (48, 48, 48))),
                            ("model grid 4 mm in LIA axes (brain)", io.model_grid_at(fixed, 4.0, 16, LIA))):
        exporter = export.FieldExporter(model_ref, fixed, prealign)
        disp = torch.randn(1, 3, *model_ref.GetSize()[::-1], generator=generator)
        disp = torch.nn.functional.avg_pool3d(disp, 3, stride=1, padding=1) * 3.0  # smooth, a few voxels
        fast, field = best_of(lambda: exporter.field(disp))
        exporter.separable = False
        general, reference = best_of(lambda: exporter.field(disp))
        exporter.separable = exporter.axis_weights is not None
        difference = float((field - reference).abs().max())
        source = exporter.source(labels, is_label=True)
        by_index, warped = best_of(lambda: exporter.warp(source, field))
        by_grid_sample, expected = best_of(lambda: grid_sample_labels(source, field, exporter.size_xyz))
        print(f"{name}: field {general:.3f} s by grid_sample -> {fast:.3f} s separable "
              f"(largest difference {difference:.1e} mm); label warp {by_grid_sample:.3f} s by grid_sample -> "
              f"{by_index:.3f} s by index ({int((warped != expected).sum())} voxels differ)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
