"""A PNG montage of a registration, one row per step: fixed, warped moving, difference, label
outlines (fixed in white, warped moving in colour) and the Jacobian determinant (diverging colour map
centred on 1, folded voxels det <= 0 in black)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _slice(image: sitk.Image | None, index: int) -> np.ndarray | None:
    if image is None:
        return None
    return sitk.GetArrayFromImage(image)[index]


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [1, 99])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def write_montage(path: str | Path, fixed: sitk.Image, moving_on_fixed: sitk.Image, result,
                  fixed_seg: sitk.Image | None = None, moving_seg_on_fixed: sitk.Image | None = None,
                  slice_index: int | None = None, title: str = "") -> Path:
    """``moving_on_fixed`` / ``moving_seg_on_fixed``: the inputs before deformable registration
    (step 0), resampled onto the fixed grid. ``result``: a RegistrationResult with step images."""
    # matplotlib on use only: the backend must be chosen before pyplot loads, and only the demo draws
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    k = fixed.GetSize()[2] // 2 if slice_index is None else slice_index
    f = _normalise(_slice(fixed, k))
    fs = _slice(fixed_seg, k)
    rows = [("input", moving_on_fixed, moving_seg_on_fixed, None)]
    rows += [((f"step {s.index}" if s.kind != "adapt" else f"step {s.index} (adapt)") + (f"  Dice {s.dice:.1f}%" if s.dice is not None else "")
              + f"  NJD {s.njd_percent:.2f}%", s.warped, s.warped_seg, s.jacobian) for s in result.steps]
    cols = ["fixed", "moving / warped", "|difference|", "labels (fixed white)", "Jacobian det"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.4 * len(cols), 2.4 * len(rows)), squeeze=False)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=2.0)
    for r, (name, warped, warped_seg, jac) in enumerate(rows):
        w = _normalise(_slice(warped, k))
        axes[r, 0].imshow(f, cmap="gray")
        axes[r, 1].imshow(w, cmap="gray")
        axes[r, 2].imshow(np.abs(w - f), cmap="magma", vmin=0, vmax=1)
        axes[r, 3].imshow(w, cmap="gray")
        if fs is not None:
            axes[r, 3].contour(fs, levels=np.unique(fs)[1:] - 0.5, colors="white", linewidths=0.5)
        ws = _slice(warped_seg, k)
        if ws is not None:
            axes[r, 3].contour(ws, levels=np.unique(ws)[1:] - 0.5, cmap="tab10", linewidths=0.7)
        if jac is not None:
            j = _slice(jac, k)
            axes[r, 4].imshow(np.clip(j, 0, 2), cmap="RdBu_r", norm=norm)
            folds = np.ma.masked_where(j > 0, np.ones_like(j))
            axes[r, 4].imshow(folds, cmap="gray_r", vmin=0, vmax=1)
        else:
            axes[r, 4].imshow(np.ones_like(f), cmap="RdBu_r", norm=norm)
        axes[r, 0].set_ylabel(name, fontsize=8)
        for c in range(len(cols)):
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(cols[c], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
