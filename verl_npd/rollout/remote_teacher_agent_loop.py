"""verl's agent loop beside a teacher served outside the job (``npd.teacher.url``,
:mod:`verl_npd.rollout.remote_teacher`), which has no replicas in the job.

verl/experimental/agent_loop/agent_loop.py:516-523 builds an ``AsyncTeacherLLMServerManager``
whenever distillation is enabled (the actor's loss needs it enabled), and its ``__init__``
(verl/experimental/teacher_loop/teacher_manager.py:93) requires a client per teacher; with
``use_teacher_policy`` off the trainer passes None (verl/trainer/ppo/ray_trainer.py:963) and every
agent-loop worker failed at start. NPD uses the agent loop only to validate, which never asks the
teacher (agent_loop.py:1040), so None now means stand-ins that fail clearly if anything does ask.
A client verl passes is used as before.
"""

from __future__ import annotations

import functools

from verl_npd.platform.verl_version import apply_once_when_imported


class ServedTeacherClient:
    """Stands in verl's agent loop for a teacher served outside the job (``npd.teacher.url``)."""

    def __init__(self, teacher_key: str):
        self.teacher_key = teacher_key

    def __getattr__(self, name: str):
        raise RuntimeError(
            f"teacher {self.teacher_key!r} is served outside this job (npd.teacher.url): verl's agent loop "
            f"cannot score with it ({name!r}); NPD scores through verl_npd.rollout.remote_teacher"
        )


def _patch_teacher_manager(teacher_manager) -> None:
    from verl.utils.config import omega_conf_to_dataclass

    original = teacher_manager.AsyncTeacherLLMServerManager.__init__

    @functools.wraps(original)
    def __init__(self, config, teacher_client):
        if teacher_client is None:
            # Keyed as the manager checks (teacher_manager.py:91-97): by each teacher's routing key.
            teachers = omega_conf_to_dataclass(config.distillation).teacher_models
            teacher_client = {key: ServedTeacherClient(key) for key in teachers}
        original(self, config=config, teacher_client=teacher_client)

    teacher_manager.AsyncTeacherLLMServerManager.__init__ = __init__


def register() -> None:
    apply_once_when_imported(
        "agent_loop_without_teacher_replicas", "verl.experimental.teacher_loop.teacher_manager", _patch_teacher_manager
    )
