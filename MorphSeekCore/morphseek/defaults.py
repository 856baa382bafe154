"""Every default setting of the engine, in one place (no torch: the command line reads it while it
builds its parser). The trainers' dataclasses (``train.warmup.WarmupConfig``, ``train.config.GRPOConfig``),
``register_images``, ``evaluate_dataset``, the worker's fine-tuning job and the command line take
their defaults from here; a value written out anywhere else is a bug.

What a checkpoint's run configuration (``runconfig.RunConfig``) holds (``grid`` or ``spacing``, ``similarity``, ``lambda_reg``,
``beta_kl``, ``percentiles``...) always wins over these: they are used only when it says nothing.
"""

from __future__ import annotations

#: Refinement steps T of a registration, an evaluation and a GRPO episode.
STEPS = 3
#: Of those, how many (the last) run on a grid of half the model's spacing (``io.fine_grid``), for a
#: model trained at a spacing and an image with voxels that fine: the model grid cannot follow
#: structures a few millimetres wide; the same network one step finer gained 6-8 Dice points on
#: held-back brains (docs/QUALITY.md section 11)
FINE_STEPS = 1
#: Where an image has content: its normalised intensity (on [0, 1]), averaged over a few voxels so
#: that noise does not count, above this. The network's box (``geometry.content_box``) and the
#: region adapt updates (``AdaptSettings.foreground``) both start from it.
FOREGROUND = 0.1
#: The network of each step sees only the box around the images' content (``geometry.content_box``:
#: where either image, averaged over 4^3 voxels, is above ``FOREGROUND``), widened by
#: this many voxels of the step's grid (the step fades out over them); the map is left as it was
#: outside. On the skull-stripped held-back SynthSeg brains 1.28x faster per registration at -0.07
#: Dice (+0.09 on training subjects' pairs); where the anatomy fills the grid the box is the whole
#: grid (docs/QUALITY.md section 23). ``register_images(crop=False)``: the whole grid.
CROP_MARGIN = 4
#: Whether registration uses that box: the default of ``register_images(crop=...)``, the CLI (``--no-crop``
#: turns it off), the worker's ``settings.crop`` and the Slicer panel's "Network on the content only".
CROP = True
#: Sampling temperature tau of the candidates in test-time search (METHOD.md's starting choice).
TAU = 0.3
#: Sampling temperature tau of GRPO fine-tuning's trajectories. Below METHOD.md's starting 0.3: the
#: warm-up leaves sigma at the prior's 1 (at tau = 0 only the KL term reaches it), so one sampled
#: latent at 0.3 costs the brain model 10 Dice points and GRPO's soft-Dice term spends itself on
#: repairing that noise, which the mean latent registration runs never has: fine-tuning at 0.3
#: lowered held-back Dice even on the very pairs it trained on. At 0.05 a sample costs 0.14 points
#: on the training subjects' pairs (docs/QUALITY.md section 21, benchmarks/grpo_noise_bias.py).
GRPO_TAU = 0.05
#: Trajectories J (the sampled candidates of one step) at registration: 1 = deterministic (tau unused).
SEARCH_TRAJECTORIES = 1
#: Trajectories J per step in GRPO fine-tuning (METHOD.md).
GRPO_TRAJECTORIES = 6
#: Trajectories J of the fine-tuning job the Slicer panel runs (``worker.finetune``) and of the demo.
PANEL_TRAJECTORIES = 4
#: Reward weights: Dice gain (> 0) and folding fraction (< 0), at registration and in GRPO.
W_DICE = 1.0
W_NJD = -10.0
#: Model grid (D, H, W) when neither the checkpoint's configuration nor the caller names one
#: (``register_images``, ``morphseek warmup --grid``, ``WarmupConfig.grid``).
MODEL_GRID = (64, 64, 64)
#: Similarity of the warm-up (and of GRPO's L_warm) when neither its configuration nor the
#: checkpoint's names one: "mse", "ncc" or "mind".
SIMILARITY = "mse"
#: Local NCC window (voxels of the model grid) of the "ncc" similarity.
NCC_WINDOW = 9
#: Diffusion-regulariser weight per similarity on [0, 1] images (VoxelMorph's choices for MSE, NCC).
LAMBDA_REG = {"mse": 0.02, "ncc": 1.0, "mind": 0.5}
#: GRPO's diffusion weight of L_warm when neither its configuration nor the warm-up run's names one.
#: (It is not ``LAMBDA_REG[similarity]``: changing it would change the results of fine-tuning such
#: hand-made checkpoints; every checkpoint the warm-up writes names its own ``lambda_reg``.)
GRPO_LAMBDA_REG_FALLBACK = 1.0
#: KL weight of the warm-up objective (METHOD.md: about 1e-3), and GRPO's first one.
BETA_KL = 1e-3
#: Intensity normalisation: these percentiles of an image's voxels map to 0 and 1.
PERCENTILES = (1.0, 99.0)
#: Test-time optimisation iterations on the model grid of the demo and the Slicer panel (``morphseek
#: register --adapt`` stays 0 unless asked), each followed by ``AdaptSettings.fine_iterations`` on the
#: fine grid (``io.fine_grid``); chosen on training subjects' pairs (docs/QUALITY.md section 2).
ADAPT = 30
#: test-time optimisation's regulariser weight (``AdaptSettings.lambda_reg``): higher gives smoother
#: maps (lower SDlogJ) at some Dice. 1.5: the smallest weight that keeps NJD under half the 0.5 %
#: limit on the training pairs, skull-stripped and whole-head, since adapt's finer stage moved onto
#: the fixed image's voxels (1: 0.31 / 0.38 %; 1.5: 0.17 / 0.20 %, for 1.0 / 0.4 Dice points;
#: docs/QUALITY.md section 11)
ADAPT_LAMBDA = 1.5
#: Set (unless already set) by ``morphseek`` and the Slicer worker before torch loads OpenMP: idle
#: threads sleep instead of spinning. With another process busy on one of 2 cores, spinning made the
#: brain sample's test-time optimisation 1.6x (a busy loop) to 6x (a training process) slower; with
#: the cores free it costs nothing measurable (``benchmarks/openmp_wait.py``, docs/BENCHMARKS.md).
OPENMP_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
#: ``process.keep_freed_memory``: blocks up to this size (and this much free memory) stay in the
#: heap of ``morphseek`` and the Slicer worker when freed (1 GiB, the largest glibc accepts as an
#: int; a brain step's largest tensor is about 200 MB).
KEPT_MEMORY_BYTES = 1 << 30
#: The network's arithmetic at registration (``register.resolve_precision``): "auto" is bf16 on
#: CPUs with bf16 matrix units (AMX; about 1.5x faster steps, Dice the same to a few hundredths,
#: docs/QUALITY.md section 17) and float32 elsewhere; "float32" gives the same numbers on every CPU.
PRECISION = "auto"
#: The values ``precision`` / ``--precision`` accept.
PRECISIONS = ("auto", "float32", "bfloat16")
#: Pre-alignment of ``morphseek register`` ("affine" or "none").
PREALIGN = "affine"
#: GRPO episodes of the fine-tuning job the Slicer panel runs.
PANEL_EPISODES = 20
