#!/usr/bin/env python
"""The uniform average of the weights of several checkpoints of one run (tail averaging, as SWA):
e.g. the checkpoints a GRPO fine-tuning saved every 16 episodes, whose held-back Dice wanders from
one to the next (docs/QUALITY.md section 22).

    python scripts/average_checkpoints.py --out runs/grpo/avg/model \\
        runs/grpo/ep16/model runs/grpo/ep32/model runs/grpo/ep48/model

The checkpoints must share one architecture; the average is saved with the last one's run
configuration (no optimiser state: it is a model to register with, not a run to resume).
"""

from __future__ import annotations

import argparse
import sys

import torch

from morphseek.checkpoint import checkpoint_files, load_checkpoint, save_checkpoint
from morphseek.errors import MorphSeekError


def average_state(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """Floating-point entries averaged (in float64), the others taken from the last state.
    MorphSeekError naming the checkpoint whose entries or shapes differ from the first's."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first):
            raise MorphSeekError(f"checkpoint {name}: its weights do not match those of {names[0]} "
                                 "(another architecture); only checkpoints of one run can be averaged")
    return {key: (sum(s[key].double() for s in states) / len(states)).to(value.dtype)
            if value.is_floating_point() else states[-1][key] for key, value in first.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="checkpoints of one run (NAME, NAME.safetensors or NAME.json)")
    p.add_argument("--out", required=True, help="the averaged model to write (NAME -> NAME.safetensors + NAME.json)")
    args = p.parse_args(argv)
    try:
        loaded = [load_checkpoint(path) for path in args.checkpoints]
        model, config, _ = loaded[-1]
        model.load_state_dict(average_state([m.state_dict() for m, _, _ in loaded], args.checkpoints))
        save_checkpoint(args.out, model, config)
    except MorphSeekError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {checkpoint_files(args.out)[0]}: the average of {len(loaded)} checkpoints")
    return 0


if __name__ == "__main__":
    sys.exit(main())
