"""Shapes and build hyperparameters of the toy world (pure dataclasses: importing this is cheap)."""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelShape:
    """A Qwen2 shape. head_dim is 32 because vLLM's CPU attention supports no smaller head size."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int = 32


@dataclass(frozen=True)
class TrainSpec:
    """How one model is made: its shape and its SFT run on ground-truth worked answers."""

    shape: ModelShape
    max_steps: int
    batch_size: int
    lr: float
    # Linear lr warm-up from 0 over this many steps.
    warmup_steps: int
    # The lr decays by a cosine to this fraction of ``lr`` over ``max_steps`` (1.0: constant).
    final_lr_fraction: float
    # Stop as soon as the accuracy on the dev prompts reaches this (None: run all ``max_steps``).
    target_accuracy: float | None = None


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines the built world; the defaults are what ``toy-v1`` is built with."""

    seed: int = 0
    # Distinct train-split problems that the SFT batches of teacher and student are drawn from.
    n_sft_problems: int = 20_000
    # Rows of train.parquet (the distillation prompts; the first problems of the SFT pool).
    n_train_prompts: int = 4096
    # Rows of val.parquet; the manifest's accuracies are measured on all of them.
    n_val_prompts: int = 512
    # Held-out prompts (disjoint from val.parquet) that decide when the student's warm-up stops.
    n_dev_prompts: int = 256
    # ~0.6M parameters: reaches ~98% in 600 steps, about 2 CPU minutes on 2 cores.
    teacher: TrainSpec = field(
        default_factory=lambda: TrainSpec(
            ModelShape(hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=384),
            max_steps=600, batch_size=64, lr=3e-3, warmup_steps=30, final_lr_fraction=0.1,
        )
    )  # fmt: skip
    # ~0.2M parameters, warmed up at a constant lr only until it solves 30% of the dev prompts: it
    # knows the format and sits on the steep part of its learning curve, so a few dozen distillation
    # steps lift it a lot. Stopping on accuracy, not on a step count, lands it there whatever the
    # machine: the step at which this tiny model "gets" carries varies a lot with float details.
    # (A 2-layer student warmed up the same way gained only 11-16 points from 30 distillation-like
    # steps, where this one gains 20-45.)
    student: TrainSpec = field(
        default_factory=lambda: TrainSpec(
            ModelShape(hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=2, intermediate_size=256),
            max_steps=1500, batch_size=64, lr=3e-3, warmup_steps=10, final_lr_fraction=1.0,
            target_accuracy=0.3,
        )
    )  # fmt: skip
    # torch threads during the build (the target machine has 2 cores).
    num_threads: int = 2

# A learning rate that makes the warmed-up student improve fast under distillation with verl's
# default actor optimizer (AdamW, betas (0.9, 0.999), constant, no warm-up): SFT on the teacher's
# greedy answers, 30 steps of 32 prompts, lifts it by about 20 points at 1e-4 to 3e-4. From 1e-3 up
# the fresh optimizer's first steps knock the tiny student back instead.
STUDENT_DISTILL_LR = 2e-4
