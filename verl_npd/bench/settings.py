"""What a benchmark run compares on: the recipe (configs of NPD and of verl's baseline) and the scale
(steps, batch, validation set and frequency), which is the same for every method."""

from __future__ import annotations

import os
from dataclasses import dataclass

import verl_npd
import verl_npd.config

# The folder that holds the running verl_npd: a checkout's root when it runs from one (the
# benchmark then records the checkout's commit), else the site-packages of an installed package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(verl_npd.__file__)))
# The package's Hydra configs: NPD's, and the toy's verl OPD configs in toy_opd/ (package data).
CONFIG_DIR = os.path.dirname(os.path.abspath(verl_npd.config.__file__))


@dataclass(frozen=True)
class Recipe:
    """The Hydra configs the methods start from (absolute config dirs, as Hydra needs)."""

    npd_config_dir: str
    npd_config_name: str
    # verl's OPD modes: config/opd_baseline.yaml (sync), opd_separate_async.yaml, ... (methods.py);
    # a mode whose config the folder lacks is skipped.
    opd_config_dir: str
    # The CPU toy world: the only setting where SFT data (teacher responses) and the teacher's
    # accuracy can be made by the benchmark itself, with transformers on the CPU.
    toy: bool

    def has_opd_config(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self.opd_config_dir, f"{name}.yaml"))

    @classmethod
    def toy_cpu(cls) -> Recipe:
        return cls(
            npd_config_dir=CONFIG_DIR,
            npd_config_name="npd_toy",
            opd_config_dir=os.path.join(CONFIG_DIR, "toy_opd"),
            toy=True,
        )

    @classmethod
    def gpu(cls, recipe_dir: str) -> Recipe:
        """A GPU recipe folder holding ``config/npd.yaml`` and ``config/opd_baseline.yaml``, by its path
        (the GPU recipes are the repository's ``recipes/*``, not package data)."""
        config_dir = os.path.join(os.path.abspath(recipe_dir), "config")
        for name in ("npd.yaml", "opd_baseline.yaml"):
            if not os.path.isfile(os.path.join(config_dir, name)):
                raise FileNotFoundError(f"{recipe_dir}: no config/{name} (expected a GPU recipe folder, see recipes/)")
        return cls(config_dir, "npd", config_dir, toy=False)


@dataclass(frozen=True)
class Scale:
    """Run size, applied alike to every method; None keeps the recipe's own value."""

    steps: int | None
    train_batch_size: int | None
    # Held-out prompts validated on (toy only: toy_data.validation_set; None: the recipe's own set).
    val_size: int | None
    test_freq: int | None
    # Runs per method, with seeds 1..seeds (seed 1 is the recipes' own data.seed).
    seeds: int

    @property
    def seed_values(self) -> list[int]:
        return list(range(1, self.seeds + 1))


# The toy comparison: 300 steps of the recipes' 64 prompts, long enough for verl's OPD to reach 90% of
# the teacher (it was still short of it after 150); 1,024 held-out prompts every 10 steps (one
# validation of 512 swung by up to 16 points between neighbours); 3 seeds.
TOY_FULL = Scale(steps=300, train_batch_size=None, val_size=1024, test_freq=10, seeds=3)
# A smoke run of every code path in a few minutes (the test's setting).
TOY_MINI = Scale(steps=2, train_batch_size=16, val_size=32, test_freq=2, seeds=1)
# GPU recipes: their own steps, batch, validation set and frequency.
GPU_RECIPE = Scale(steps=None, train_batch_size=None, val_size=None, test_freq=None, seeds=3)
