"""``${npd_toy:<field>}`` and ``${npd_toy_cross:<field>}`` in a config: a path or number of the toy
world, or of its second teacher (the one with a tokenizer of its own, ``verl_npd.toy.cross``), built
on first use.

Registered only where the toy's configs are used: by ``python -m verl_npd.main_npd`` when its
composed config uses it (its default, the toy demo, does; it resolves the config before Ray starts,
so its workers need no resolver), the benchmark and the tests. Fields are those of :class:`verl_npd.toy.world.ToyWorld`
(``teacher_dir``, ``student_dir``, ``train_parquet``, ``val_parquet``, ``tokenizer_dir``,
``teacher_accuracy``, ...) and of :class:`verl_npd.toy.cross.CrossTeacher` (``teacher_dir``,
``tokenizer_dir``, ``teacher_accuracy``).
"""

from __future__ import annotations

RESOLVER_NAME = "npd_toy"
CROSS_RESOLVER_NAME = "npd_toy_cross"


def resolve_toy_field(name: str):
    from verl_npd.toy.world import ToyWorld, ensure_toy_world

    if name not in ToyWorld.__dataclass_fields__:
        raise ValueError(f"${{{RESOLVER_NAME}:{name}}}: unknown field; known: {sorted(ToyWorld.__dataclass_fields__)}")
    return getattr(ensure_toy_world(), name)


def resolve_cross_teacher_field(name: str):
    from verl_npd.toy.cross import CrossTeacher, ensure_cross_teacher

    if name not in CrossTeacher.__dataclass_fields__:
        raise ValueError(
            f"${{{CROSS_RESOLVER_NAME}:{name}}}: unknown field; known: {sorted(CrossTeacher.__dataclass_fields__)}"
        )
    return getattr(ensure_cross_teacher(), name)


def register() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER_NAME):
        OmegaConf.register_new_resolver(RESOLVER_NAME, resolve_toy_field)
    if not OmegaConf.has_resolver(CROSS_RESOLVER_NAME):
        OmegaConf.register_new_resolver(CROSS_RESOLVER_NAME, resolve_cross_teacher_field)
