"""The embedded toy distillation world: a tiny Qwen2 teacher, a weaker student, data and a reward.

    from verl_npd.toy import ensure_toy_world
    world = ensure_toy_world()   # built on first use (a few CPU minutes), cached afterwards
    world.teacher_dir, world.student_dir, world.train_parquet, world.teacher_accuracy, ...

Importing this package is cheap: ``main_npd`` imports ``verl_npd.toy.resolvers`` (which runs this
file) when its config uses ``${npd_toy:...}``, and verl's reward workers import the reward. The torch-backed
helpers load on first attribute access.
"""

import importlib

from verl_npd.toy.config import STUDENT_DISTILL_LR, BuildConfig, ModelShape, TrainSpec
from verl_npd.toy.reward import compute_score, reward_function_path, reward_overrides
from verl_npd.toy.task import DATA_SOURCE, Problem, expression_of, extract_answer, generate_problems
from verl_npd.toy.world import ToyWorld, default_root, ensure_toy_world, manifest_of, read_problems

# Exports whose modules import torch and transformers, loaded on first access (PEP 562).
_LAZY = {
    "evaluate_accuracy": "verl_npd.toy.models",
    "greedy_generate": "verl_npd.toy.models",
    "train_sft": "verl_npd.toy.models",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATA_SOURCE",
    "STUDENT_DISTILL_LR",
    "BuildConfig",
    "ModelShape",
    "Problem",
    "ToyWorld",
    "TrainSpec",
    "compute_score",
    "default_root",
    "ensure_toy_world",
    "evaluate_accuracy",
    "expression_of",
    "extract_answer",
    "generate_problems",
    "greedy_generate",
    "manifest_of",
    "read_problems",
    "reward_function_path",
    "reward_overrides",
    "train_sft",
]
