#!/usr/bin/env python
"""Write the shipped brain sample (Resources/SampleData/brain) from the prepared label maps.

    python scripts/prepare_brains.py && python scripts/make_brain_sample.py

Six subjects of the SynthSeg training label maps (Apache-2.0), affinely aligned, at 2 mm: for each
a skull-stripped T1-like image synthesised from its labels (8-bit) and its 31 evaluation
structures. Subjects 01-04 are the demo's labelled fine-tuning cases (the warm-up saw them without
labels); 09 and 10 are held back from all training and form the demo's registration pair.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from morphseek import data, io
from morphseek.brains import evaluation_labels, t1_image

REPO = Path(__file__).resolve().parents[1]
FINETUNE = ("01", "02", "03", "04")
HELD_BACK = ("09", "10")
LICENCE = """# Brain sample data

Derived from the SynthSeg training label maps (`data/training_label_maps/training_seg_01..10` of
the SynthSeg repository, B. Billot et al., Apache-2.0, https://github.com/BBillot/SynthSeg), which
are label maps of real subjects. Each map was affinely aligned to subject 01 and resampled to
2 mm (nearest neighbour); the images are skull-stripped T1-like images synthesised from the labels
(`morphseek.brains.t1_image`, stored as 8-bit), and `*_seg.nii.gz` holds the 31 evaluation structures
(`morphseek.brains.EVAL_LABELS`, FreeSurfer ids). Made by `scripts/make_brain_sample.py`.

- `01`-`04`: labelled cases for the demo's GRPO fine-tuning (the brain model's warm-up saw them,
  without labels).
- `09`, `10`: held back from every training run; the demo registers `09` (moving) to `10` (fixed).

Apache-2.0 applies to these derived files as to the source; no patient images are included.
"""


def main() -> int:
    prepared = REPO / "runs" / "brains" / "labels"
    out = REPO / "Resources" / "SampleData" / "brain"
    if not prepared.is_dir():
        print(f"error: {prepared} not found: run scripts/prepare_brains.py first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    subjects = []
    for n, i in enumerate(FINETUNE + HELD_BACK):
        labels = io.read_labels(prepared / f"{i}.nii.gz")
        array = sitk.GetArrayFromImage(labels).astype(np.int64)
        image = t1_image(array, np.random.default_rng(2000 + n))
        io.write_image(io.from_array(np.round(255 * image).astype(np.uint8), labels), out / f"{i}_t1.nii.gz")
        seg = evaluation_labels(array).astype(np.uint8)
        io.write_image(io.from_array(seg, labels), out / f"{i}_seg.nii.gz")
        subjects.append({"id": i, "image": f"{i}_t1.nii.gz", "labels": f"{i}_seg.nii.gz"})
    data.write_manifest(out, subjects, data.ordered_pairs(FINETUNE), data.ordered_pairs(HELD_BACK),
                        "Brain sample: SynthSeg label maps (Apache-2.0), aligned, 2 mm, T1-like images", modality="mono")
    (out / "README.md").write_text(LICENCE)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
