"""``${npd_toy:<field>}`` in any verl config: a path or number of the toy world, built on first use.

Registered with OmegaConf by the verl plugin in every process, so the same YAML works for
``python -m verl_npd.main_npd`` and for verl's own ``python -m verl.trainer.main_ppo``. Fields are
those of :class:`verl_npd.toy.world.ToyWorld` (``teacher_dir``, ``student_dir``, ``train_parquet``,
``val_parquet``, ``tokenizer_dir``, ``teacher_accuracy``, ...).
"""

from __future__ import annotations

import os

RESOLVER_NAME = "npd_toy"


def resolve_toy_field(name: str):
    from verl_npd.toy.world import ToyWorld, ensure_toy_world

    if name not in ToyWorld.__dataclass_fields__:
        raise ValueError(f"${{{RESOLVER_NAME}:{name}}}: unknown field; known: {sorted(ToyWorld.__dataclass_fields__)}")
    return getattr(ensure_toy_world(), name)


def known_teacher_accuracy(model_path: str) -> float | None:
    """The build-time accuracy when ``model_path`` is the built toy world's teacher, else None."""
    from verl_npd.toy.world import _load, default_root

    world = _load(default_root())
    if world is None or os.path.realpath(model_path) != os.path.realpath(world.teacher_dir):
        return None
    return world.teacher_accuracy


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER_NAME):
        OmegaConf.register_new_resolver(RESOLVER_NAME, resolve_toy_field)
