"""The main job, ``morphseek demo``, on real anatomy: the shipped brain model registers a held-back
pair of the shipped brain sample step by step, GRPO fine-tunes it on a few labelled cases, and the
pair is registered again; a per-step table (Dice against no registration), PNG montages and
report.json. Nothing is downloaded; about 3 minutes on 2 CPU cores."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import defaults, io
from .checkpoint import find_checkpoint, load_checkpoint, resolve_device
from .data import load_dataset, load_samples, read_pair
from .errors import MorphSeekError
from .montage import write_montage
from .outputs import staged_folder
from .register import register_images
from .train.grpo import GRPOConfig, grpo_finetune

RESOURCES = Path(__file__).resolve().parents[2] / "Resources"
BRAIN_MODEL = RESOURCES / "Models" / "morphseek-brain"
BRAIN_SAMPLE = RESOURCES / "SampleData" / "brain"


def _register(dataset, pair, model, steps: int, adapt: int, device, seed: int):
    images = read_pair(dataset, pair)
    # the sample pairs are affinely aligned already (scripts/prepare_brains.py), as the model expects
    result = register_images(images.fixed, images.moving, model, fixed_seg=images.fixed_seg,
                             moving_seg=images.moving_seg, steps=steps, adapt=adapt, prealign="none",
                             device=str(device), seed=seed, names=images.names)
    return result, images[:4]


def run_demo(out: str | Path = "demo-output", model: str | Path = BRAIN_MODEL, sample: str | Path = BRAIN_SAMPLE,
             steps: int = defaults.STEPS, adapt: int = defaults.ADAPT, episodes: int = 6,
             trajectories: int = defaults.PANEL_TRAJECTORIES, seed: int = 0,
             device: str = "auto", overwrite: bool = False) -> dict:
    """Register, fine-tune with GRPO, register again; returns the report (also written as JSON).

    Everything is written into a temporary folder beside ``out`` and moved into place at the end
    (``morphseek.outputs.staged_folder``): an interrupted or failed demo leaves ``out`` as it was; an
    existing demo result is replaced as a whole only with ``overwrite=True``."""

    if steps < 1 or episodes < 0 or trajectories < 2 or adapt < 0:
        raise MorphSeekError(f"demo needs steps >= 1, episodes >= 0, trajectories >= 2 and adapt >= 0 "
                             f"(got {steps}, {episodes}, {trajectories}, {adapt})")
    final, model = Path(out), Path(model)
    if find_checkpoint(model) is None:
        raise MorphSeekError(f"{model}: the brain model is missing (it ships in Resources/Models)")
    dataset = load_dataset(sample, require_labels=True)
    if not dataset.val_pairs or not dataset.train_pairs:
        raise MorphSeekError(f"{sample}: the demo needs labelled train and val pairs in its manifest")
    device = resolve_device(device)
    with staged_folder(final, overwrite=overwrite, inputs=[model, sample], command="demo") as stage:
        report = _run_demo(stage, final, model, dataset, sample, steps, adapt, episodes, trajectories, seed, device)
    print(f"\nwrote {final}/report.json, the montage and {final}/{report['pair']}/ "
          f"(total {sum(report['timings'].values()):.0f} s)")
    return report


def _run_demo(out: Path, final: Path, model: Path, dataset, sample, steps, adapt, episodes, trajectories, seed,
              device) -> dict:
    pair = dataset.val_pairs[0]
    name = f"{pair[0]}_to_{pair[1]}"
    timings, tables = {}, {}

    print(f"[1/3] {model.name} registers the held-back pair {name} in {steps} steps"
          f"{f' + test-time optimisation ({adapt} iterations)' if adapt else ''}")
    tic = time.perf_counter()
    before, images = _register(dataset, pair, model, steps, adapt, device, seed)
    timings["register_shipped_seconds"] = time.perf_counter() - tic
    print(before.step_table())
    tables["shipped"] = before

    finetuned = model
    if episodes:
        net, run_config, _ = load_checkpoint(model, device=device)

        def load(pairs):
            return load_samples(dataset, pairs, run_config, device, net.divisor)

        print(f"\n[2/3] GRPO fine-tuning on {len(dataset.train_pairs)} labelled pairs: {episodes} episodes of "
              f"{steps} steps, J = {trajectories}; held back: {len(dataset.val_pairs)} pairs")
        tic = time.perf_counter()
        finetuned = out / "model-finetuned.safetensors"
        result = grpo_finetune(net, load(dataset.train_pairs), load(dataset.val_pairs),
                               GRPOConfig(steps=steps, trajectories=trajectories, episodes=episodes, seed=seed,
                                          validate_every=max(episodes, 1)),
                               out=finetuned, log=out / "finetune.log", progress=True, run_config=run_config)
        timings["finetune_seconds"] = time.perf_counter() - tic
        print(f"held-back Dice (model grid, {steps} steps): "
              f"{result.validation_start.get('val_dice', float('nan')):.2f} % before fine-tuning, "
              f"{result.validation.get('val_dice', float('nan')):.2f} % after")
        print(f"\n[3/3] the fine-tuned model registers {name} again")
        tic = time.perf_counter()
        after, _ = _register(dataset, pair, finetuned, steps, adapt, device, seed)
        timings["register_finetuned_seconds"] = time.perf_counter() - tic
        print(after.step_table())
        tables["finetuned"] = after

    fixed, moving, fixed_seg, moving_seg = images
    final = tables.get("finetuned", before)
    final.save(out / name)
    montage = write_montage(out / f"{name}.png", fixed, io.resample_to(moving, fixed), final, fixed_seg,
                            io.resample_to(moving_seg, fixed, is_label=True),
                            title=f"MorphSeek demo: brain {pair[0]} -> {pair[1]} (held back)")
    summary = {"no_registration_dice": final.initial_dice}
    print(f"\nsummary for {name} (mean Dice % over {len(final.settings['labels'])} structures, NJD %)")
    print(f"  {'no registration':<28} Dice {final.initial_dice:6.2f}")
    for key, result in tables.items():
        for s in result.steps:
            label = f"{key} model, {'+ adapt' if s.kind == 'adapt' else f'step {s.index}'}"
            summary[f"{key}_{s.kind}_{s.index}"] = {"dice": s.dice, "njd_percent": s.njd_percent}
            print(f"  {label:<28} Dice {s.dice:6.2f}   NJD {s.njd_percent:.3f}")
    report = {"model": str(model), "sample": str(sample), "pair": name, "device": str(device), "steps": steps,
              "adapt": adapt, "episodes": episodes, "trajectories": trajectories, "seed": seed,
              "timings": timings, "summary": summary,
              "registrations": {k: r.report() for k, r in tables.items()}, "finetuned_model": str(finetuned),
              "montage": str(montage)}
    # paths in the report name the final folder, not the temporary one
    report = json.loads(json.dumps(report).replace(json.dumps(str(out))[1:-1], json.dumps(str(final))[1:-1]))
    io.write_text(json.dumps(report, indent=2), out / "report.json")
    return report
